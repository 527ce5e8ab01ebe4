"""Safe defaults as an operator meets them (issue 18, items 7 and 12): development auth never
silently on a real address, the one-time console link only where it is safe, misspelt PIE_*
variables named, flag errors that name the right flag, unknown token scopes refused."""

from __future__ import annotations

import json
import os
import signal

import pytest
from conftest import free_port
from test_startup_errors import assert_config_error, run_pie, unreachable_url

# --- item 7: development auth on a non-loopback address -----------------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_serve_on_a_public_address_without_auth_is_refused(tmp_path, host):
    """Neither Cognito nor PIE_JWT_SECRET: a generated secret and a one-time admin link used to
    be served on every interface. Now one line naming the opt-in, exit 2, nothing started."""
    result = run_pie(
        ["serve", "--host", host, "--port", str(free_port())],
        tmp_path,
        PIE_DATABASE_URL=unreachable_url(),  # the old code retried it (and then exited 1)
        PIE_DB_STARTUP_TIMEOUT="1",
    )
    line = assert_config_error(result, "PIE_AUTH_MODE=development", "PIE_JWT_SECRET", "--host/PIE_HOST")
    assert repr(host) in line
    assert not (tmp_path / "data" / "dev-jwt-secret").exists()


def _serve_in_process(monkeypatch, tmp_path, capsys, *args: str, **env: str) -> tuple[str, str, int]:
    """`pie serve ARGS` in this process with ``env`` (a fresh environment of PIE_* variables),
    the database start and migration skipped and uvicorn not run: (stdout, stderr, exit code)."""
    import uvicorn

    from pie import cli, logconfig, migrate
    from pie.config import get_settings

    monkeypatch.setattr(logconfig, "_current_format", getattr(logconfig, "_current_format", "text"), raising=False)
    for name in [k for k in os.environ if k.startswith("PIE_") and not k.startswith("PIE_TEST_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("PIE_DATA_DIR", str(tmp_path))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    get_settings.cache_clear()
    monkeypatch.setattr(cli, "_database_url", lambda s: "postgresql://unused/unused")
    monkeypatch.setattr(cli, "check_connection_budget", lambda *a, **k: None, raising=False)
    monkeypatch.setattr(cli, "check_port", lambda *a, **k: None)  # nothing is bound
    monkeypatch.setattr(migrate, "upgrade", lambda *a, **k: None)
    monkeypatch.setattr(migrate, "head_revision", lambda *a, **k: "head")
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)
    monkeypatch.setattr(signal, "signal", lambda *a, **k: None)
    capsys.readouterr()
    try:
        code = cli.main(["serve", *args])
    finally:
        get_settings.cache_clear()
    out, err = capsys.readouterr()
    return out, err, code


DEV_WARNING = "development authentication is on"


def test_the_development_opt_in_serves_a_public_address_without_the_one_time_link(monkeypatch, tmp_path, capsys):
    out, err, code = _serve_in_process(
        monkeypatch, tmp_path, capsys, "--host", "0.0.0.0", "--port", "8124", PIE_AUTH_MODE="development"
    )
    assert code == 0, err
    assert "Console:" not in out and "login/once" not in out + err  # the link was printed as 127.0.0.1
    warnings = [line for line in err.splitlines() if " WARNING " in line and DEV_WARNING in line]
    assert len(warnings) == 1, err
    assert "pie token --admin" in err  # how to sign in instead


def test_the_one_time_link_only_on_loopback_and_never_in_json_logs(monkeypatch, tmp_path, capsys):
    out, err, code = _serve_in_process(monkeypatch, tmp_path, capsys, "--host", "127.0.0.1", "--port", "8125")
    assert code == 0, err
    assert "Console: http://127.0.0.1:8125/console/login/once?code=" in out
    assert DEV_WARNING in err

    out, err, code = _serve_in_process(
        monkeypatch, tmp_path, capsys, "--host", "127.0.0.1", "--port", "8126", PIE_LOG_FORMAT="json"
    )
    assert code == 0, err
    assert "login/once" not in out + err
    records = [json.loads(line) for line in (out + err).splitlines() if line.strip()]  # every line is JSON
    assert any(r["level"] == "WARNING" and DEV_WARNING in r["message"] for r in records)
    assert any("listening on http://127.0.0.1:8126" in r["message"] for r in records)


def test_a_warning_whenever_development_tokens_are_accepted(monkeypatch, tmp_path, capsys):
    _, err, code = _serve_in_process(monkeypatch, tmp_path, capsys, "--port", "8127", PIE_JWT_SECRET="s")
    assert code == 0 and DEV_WARNING in err and "PIE_JWT_SECRET" in err
    # Cognito alone: no development tokens, no warning
    _, err, code = _serve_in_process(
        monkeypatch,
        tmp_path,
        capsys,
        "--port",
        "8128",
        PIE_COGNITO_REGION="ap-southeast-2",
        PIE_COGNITO_USER_POOL_ID="ap-southeast-2_X",
    )
    assert code == 0 and DEV_WARNING not in err, err


def test_the_development_opt_in_with_cognito_is_a_contradiction(tmp_path):
    assert_config_error(
        run_pie(
            ["serve", "--port", "0"],
            tmp_path,
            PIE_AUTH_MODE="development",
            PIE_COGNITO_REGION="ap-southeast-2",
            PIE_COGNITO_USER_POOL_ID="ap-southeast-2_X",
        ),
        "PIE_AUTH_MODE=development",
        "Cognito",
    )
    assert_config_error(run_pie(["serve", "--port", "0"], tmp_path, PIE_AUTH_MODE="yes"), "PIE_AUTH_MODE")


def test_loopback_hosts():
    from pie.startup import is_loopback_host

    assert all(is_loopback_host(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "localhost"))
    assert not any(is_loopback_host(h) for h in ("0.0.0.0", "::", "", "10.1.2.3", "no-such-host.invalid"))


# --- item 12: misspelt variables, the right flag, known scopes -----------------------------------


def test_a_misspelt_variable_is_named_with_the_closest_known_one(tmp_path):
    result = run_pie(["token", "--admin"], tmp_path, PIE_JWT_SECRET="s", PIE_JWT_SECERT="t", PIE_DATABSE_URL="x")
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert any(
        "WARNING" in line and "PIE_JWT_SECERT" in line and "did you mean PIE_JWT_SECRET?" in line for line in lines
    ), result.stderr
    assert any("PIE_DATABSE_URL" in line and "did you mean PIE_DATABASE_URL?" in line for line in lines)
    # known variables (and aliases) are not reported
    assert "PIE_JWT_SECRET (" not in result.stderr and "PIE_DATA_DIR" not in result.stderr


def test_a_misspelt_variable_in_the_env_file_is_named_too(tmp_path):
    (tmp_path / ".env").write_text("PIE_JWT_SECRET=s\nPIE_LOG_LEVLE=debug\n")
    result = run_pie(["token", "--admin"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "PIE_LOG_LEVLE (.env)" in result.stderr and "did you mean PIE_LOG_LEVEL?" in result.stderr
    # an unknown variable that resembles nothing is named without a guess
    result = run_pie(["token", "--admin"], tmp_path, PIE_ZZZ_QQQ="1")
    assert "PIE_ZZZ_QQQ (environment) is not a PIE setting and is ignored" in result.stderr
    assert "did you mean" not in result.stderr.split("PIE_ZZZ_QQQ", 1)[1].splitlines()[0]


@pytest.mark.parametrize("host", ["10.255.255.1", "no-such-host.invalid"])
def test_host_errors_name_the_host_not_the_port(tmp_path, host):
    result = run_pie(
        ["serve", "--host", host, "--port", str(free_port())],
        tmp_path,
        PIE_JWT_SECRET="s",
        PIE_DATABASE_URL=unreachable_url(),
        PIE_DB_STARTUP_TIMEOUT="1",
    )
    line = assert_config_error(result, "--host/PIE_HOST", host)
    assert "--port" not in line and "PIE_PORT" not in line


@pytest.mark.parametrize("scope", ["bogus", "streamline/bogus", "streamline/"])
def test_token_refuses_an_unknown_scope(tmp_path, scope):
    line = assert_config_error(
        run_pie(["token", "--scope", "read_models", "--scope", scope], tmp_path, PIE_JWT_SECRET="s"), repr(scope)
    )
    assert "read_models" in line and "run_inference" in line  # says what exists
