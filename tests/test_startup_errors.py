"""Configuration mistakes end in one line naming the PIE_* variable (or flag), exit code 2,
before anything starts (issue 7); an unreachable database is retried for a bounded time."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import clean_subprocess_env, free_port, pie_command

COMMANDS = {
    "serve": ["serve", "--port", "0"],
    "worker": ["worker"],
    "migrate": ["migrate"],
    "token": ["token", "--admin"],
}


def unreachable_url() -> str:
    return f"postgresql://postgres@127.0.0.1:{free_port()}/nope"


def run_pie(args: list[str], cwd: Path, timeout: float = 60, **env: str | None) -> subprocess.CompletedProcess[str]:
    env.setdefault("PIE_DATA_DIR", str(cwd / "data"))
    return subprocess.run(
        [*pie_command(), *args],
        env=clean_subprocess_env(**env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_config_error(result: subprocess.CompletedProcess[str], *names: str) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_invalid_log_level_names_the_variable(tmp_path, command):
    line = assert_config_error(
        run_pie(COMMANDS[command], tmp_path, PIE_LOG_LEVEL="verbose"), "PIE_LOG_LEVEL", "verbose"
    )
    assert line.startswith(f"pie {command}: ")
    assert "'info'" in line  # says what is allowed


def test_invalid_number_names_the_variable(tmp_path):
    assert_config_error(run_pie(COMMANDS["serve"], tmp_path, PIE_WORKERS="many"), "PIE_WORKERS", "many")
    assert_config_error(run_pie(COMMANDS["serve"], tmp_path, PIE_DB_POOL_SIZE="-x"), "PIE_DB_POOL_SIZE")


def test_workers_flag_out_of_range(tmp_path):
    assert_config_error(run_pie(["serve", "--workers", "0"], tmp_path, PIE_DATABASE_URL=unreachable_url()), "--workers")


@pytest.mark.parametrize("command", ["serve", "token", "migrate"])
def test_data_dir_that_is_a_file(tmp_path, command):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    assert_config_error(
        run_pie(COMMANDS[command], tmp_path, PIE_DATA_DIR=str(blocker)), "PIE_DATA_DIR", "not a directory"
    )
    nested = blocker / "sub"
    assert_config_error(run_pie(COMMANDS[command], tmp_path, PIE_DATA_DIR=str(nested)), "PIE_DATA_DIR")


@pytest.mark.parametrize("command", ["serve", "worker", "migrate"])
def test_database_url_that_is_not_postgresql(tmp_path, command):
    line = assert_config_error(
        run_pie(COMMANDS[command], tmp_path, PIE_DATABASE_URL="mysql://root@127.0.0.1/pie"), "PIE_DATABASE_URL", "mysql"
    )
    assert "PostgreSQL" in line
    assert_config_error(run_pie(COMMANDS[command], tmp_path, PIE_DATABASE_URL="not a url"), "PIE_DATABASE_URL")


def test_port_in_use_is_found_before_the_database_starts(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        started = time.monotonic()
        # an unreachable database would be retried for 60 s: the port error comes first
        result = run_pie(
            ["serve", "--host", "127.0.0.1", "--port", str(port)],
            tmp_path,
            PIE_DATABASE_URL=unreachable_url(),
            PIE_DB_STARTUP_TIMEOUT="60",
            PIE_JWT_SECRET="s",
        )
        assert time.monotonic() - started < 30
    assert_config_error(result, "--port/PIE_PORT", str(port), "in use")

    # zero-config mode: the embedded database is not started either
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_pie(["serve", "--host", "127.0.0.1", "--port", str(port)], tmp_path)
    assert_config_error(result, "--port/PIE_PORT")
    assert not (tmp_path / "data" / "pgdata").exists()


@pytest.mark.parametrize(
    "env, names",
    [
        ({"PIE_COGNITO_REGION": "ap-southeast-2"}, ("PIE_COGNITO_REGION", "PIE_COGNITO_USER_POOL_ID")),
        ({"PIE_COGNITO_USER_POOL_ID": "ap-southeast-2_X"}, ("PIE_COGNITO_USER_POOL_ID", "PIE_COGNITO_REGION")),
        ({"PIE_JWKS_URL": "http://127.0.0.1:1/jwks.json"}, ("PIE_JWKS_URL", "PIE_JWT_RS256_ISSUER")),
    ],
)
@pytest.mark.parametrize("command", ["serve", "token"])
def test_half_configured_cognito_is_an_error(tmp_path, env, names, command):
    """No silent fall-back to development tokens (and no admin token minted)."""
    assert_config_error(run_pie(COMMANDS[command], tmp_path, **env), *names)
    assert not (tmp_path / "data" / "dev-jwt-secret").exists()


COGNITO = {"PIE_COGNITO_REGION": "ap-southeast-2", "PIE_COGNITO_USER_POOL_ID": "ap-southeast-2_X"}


@pytest.mark.parametrize("command", ["serve", "token"])
def test_jwt_secret_with_cognito_is_refused(tmp_path, command):
    line = assert_config_error(
        run_pie(COMMANDS[command], tmp_path, PIE_JWT_SECRET="leftover", **COGNITO), "PIE_JWT_SECRET", "Cognito"
    )
    assert "PIE_ALLOW_DEV_TOKENS_WITH_COGNITO" in line


def test_jwt_secret_with_cognito_when_the_operator_opts_in(tmp_path):
    result = run_pie(
        COMMANDS["token"], tmp_path, PIE_JWT_SECRET="kept", PIE_ALLOW_DEV_TOKENS_WITH_COGNITO="true", **COGNITO
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(".") == 2


def test_token_from_another_directory_does_not_invent_a_secret(tmp_path):
    """Zero-config mode: `pie token` with a PIE_DATA_DIR where `pie serve` never ran says so
    instead of writing a new secret the server would not know."""
    result = run_pie(COMMANDS["token"], tmp_path, PIE_DATA_DIR=None)
    line = assert_config_error(result, "PIE_DATA_DIR", "dev-jwt-secret", "pie serve")
    assert str(tmp_path / ".pie") in line
    assert not (tmp_path / ".pie" / "dev-jwt-secret").exists()
    # with the server's secret present it says which file signed the token
    (tmp_path / ".pie").mkdir(exist_ok=True)
    (tmp_path / ".pie" / "dev-jwt-secret").write_text("the-server-secret")
    result = run_pie(COMMANDS["token"], tmp_path, PIE_DATA_DIR=None)
    assert result.returncode == 0, result.stderr
    assert str(tmp_path / ".pie" / "dev-jwt-secret") in result.stderr
    from jose import jwt

    jwt.decode(result.stdout.strip(), "the-server-secret", algorithms=["HS256"], issuer="pie-dev")


@pytest.mark.parametrize("command", ["serve", "worker", "migrate"])
def test_unreachable_database_is_retried_then_a_clear_exit(tmp_path, command):
    started = time.monotonic()
    result = run_pie(
        COMMANDS[command] if command != "serve" else ["serve", "--port", str(free_port())],
        tmp_path,
        PIE_DATABASE_URL=unreachable_url(),
        PIE_DB_STARTUP_TIMEOUT="3",
        PIE_JWT_SECRET="s",
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    attempts = [line for line in result.stderr.splitlines() if "not reachable (attempt" in line]
    assert 2 <= len(attempts) <= 4, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"pie {command}: cannot use the database") and "PIE_DB_STARTUP_TIMEOUT" in last
    assert elapsed < 30


def _test_server_url(dbname: str, user: str = "postgres") -> str:
    import os

    from sqlalchemy.engine import make_url

    server = os.environ.get("PIE_TEST_DATABASE_URL")
    if not server:
        pytest.skip("needs PIE_TEST_DATABASE_URL (a server to be refused by)")
    return make_url(server).set(database=dbname, username=user).render_as_string(hide_password=False)


@pytest.mark.parametrize(
    "what, url",
    [
        ("database", lambda: _test_server_url("pie_no_such_database")),
        ("role", lambda: _test_server_url("postgres", user="pie_no_such_role")),
    ],
)
@pytest.mark.parametrize("command", ["serve", "worker", "migrate"])
def test_a_database_error_retrying_cannot_fix_ends_the_start_at_once(tmp_path, what, url, command):
    """A missing database or role (or a rejected password) was retried for the whole start-up
    timeout, one line per attempt: now the first error ends the start, named in the last line."""
    result = run_pie(
        COMMANDS[command] if command != "serve" else ["serve", "--port", str(free_port())],
        tmp_path,
        PIE_DATABASE_URL=url(),
        PIE_DB_STARTUP_TIMEOUT="8",
        PIE_JWT_SECRET="s",
    )
    assert result.returncode == 1, result.stderr
    assert "not reachable (attempt" not in result.stderr, result.stderr  # not retried
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"pie {command}: cannot use the database"), last
    assert f'{what} "pie_no_such_' in last and "does not exist" in last and "PIE_DATABASE_URL" in last


def test_connection_errors_retrying_cannot_fix():
    from pie.startup import is_permanent_connect_error

    for message in (
        'FATAL:  password authentication failed for user "pie"',
        'FATAL:  database "pie" does not exist',
        'FATAL:  role "pie" does not exist',
        'FATAL:  no pg_hba.conf entry for host "10.0.0.1", user "pie", database "pie", no encryption',
        "fe_sendauth: no password supplied",
        'FATAL:  role "pie" is not permitted to log in',
    ):
        assert is_permanent_connect_error(message), message
    for message in (
        "Connection refused Is the server running on that host and accepting TCP/IP connections?",
        "FATAL:  the database system is starting up",
        "FATAL:  sorry, too many clients already",
        'could not translate host name "postgres" to address: Name or service not known',
        "timeout expired",
    ):
        assert not is_permanent_connect_error(message), message


def test_the_timeout_line_names_the_first_error(tmp_path):
    result = run_pie(COMMANDS["migrate"], tmp_path, PIE_DATABASE_URL=unreachable_url(), PIE_DB_STARTUP_TIMEOUT="3")
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert "PIE_DB_STARTUP_TIMEOUT): " in last and "Connection refused" in last.split("PIE_DB_STARTUP_TIMEOUT): ")[1]
