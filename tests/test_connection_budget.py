"""The database connection budget (issue 18, item 8): at start `pie serve` and `pie worker` read
the server's max_connections and refuse (exit 2, one line with the arithmetic) when the most
connections their processes can open exceed what the server has left; the defaults let
`pie serve --workers 2` and one `pie worker` share a stock max_connections=100 with room to
spare for migrations and psql."""

from __future__ import annotations

import re
import subprocess
import time

import httpx
import psycopg
from conftest import clean_subprocess_env, free_port, pie_command
from test_startup_errors import assert_config_error, run_pie

from pie.config import Settings

STOCK_MAX_CONNECTIONS = 100
SUPERUSER_RESERVED = 3  # PostgreSQL's default superuser_reserved_connections
ROOM_FOR_MIGRATIONS_AND_PSQL = 10


def test_the_defaults_fit_two_api_processes_and_a_worker_in_a_stock_server():
    from pie.startup import connection_budget

    settings = Settings(_env_file=None, run_dispatcher=True)  # (the test kit turns it off)
    serve, worker = connection_budget(settings, "serve"), connection_budget(settings, "worker")
    used = 2 * serve.per_process + worker.per_process
    assert used <= STOCK_MAX_CONNECTIONS - SUPERUSER_RESERVED - ROOM_FOR_MIGRATIONS_AND_PSQL, (serve, worker)
    # the budget counts every connection a process opens: both pools, the dispatcher's LISTEN,
    # claim and recording connections, the webhook delivery loop's LISTEN, claim and result connections
    assert serve.per_process == (
        settings.db_pool_size + settings.db_max_overflow + settings.db_read_pool_size + 1 + 3 + 3
    ), serve
    assert worker.per_process == settings.db_pool_size + settings.db_max_overflow + 3 + 3


def _server_max_connections(url: str) -> int:
    with psycopg.connect(url) as conn:
        return int(conn.execute("SHOW max_connections").fetchone()[0])


def test_serve_refuses_a_pool_the_server_cannot_hold(database_url, tmp_path):
    """A maximum beyond the server's max_connections: exit 2 at start with the arithmetic
    (it used to start, and answer 503 "too many clients" under load)."""
    limit = _server_max_connections(database_url)
    port = free_port()
    process = subprocess.Popen(
        [*pie_command(), "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", "2"],
        env=clean_subprocess_env(
            PIE_DATABASE_URL=database_url,
            PIE_DATA_DIR=str(tmp_path / "data"),
            PIE_JWT_SECRET="s",
            PIE_DB_POOL_SIZE=str(limit),
            PIE_DB_MAX_OVERFLOW="0",
            PIE_DB_READ_POOL_SIZE="1",
            PIE_RUN_DISPATCHER="false",
            PIE_DB_CHECK_CONNECTIONS="true",  # the kit turns it off for its other servers
        ),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=90)
    except subprocess.TimeoutExpired:  # the old code served
        process.kill()
        stdout, stderr = process.communicate(timeout=30)
        raise AssertionError(f"pie serve started:\n{stderr[-2000:]}") from None
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    line = assert_config_error_after_logs(result)
    per_process = limit + 0 + 1 + 1  # pool + overflow + reads + long-poll listener (no dispatcher)
    assert f"2 process(es) x {per_process} (PIE_DB_POOL_SIZE {limit} + PIE_DB_MAX_OVERFLOW 0 + " in line, line
    assert f"= {2 * per_process} > " in line and f"(max_connections {limit} - " in line
    assert re.search(r"- \d+ reserved - \d+ in use\)", line), line
    for hint in ("PIE_DB_POOL_SIZE", "--workers", "max_connections", "PIE_DB_CHECK_CONNECTIONS=false"):
        assert hint in line.split(": ", 2)[-1], hint


def assert_config_error_after_logs(result: subprocess.CompletedProcess[str]) -> str:
    """Exit 2 and the last stderr line is the command's one error line (INFO lines of the
    start before it are fine: the budget is checked once the database answers)."""
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("pie "), last
    return last


def test_worker_refuses_a_pool_the_server_cannot_hold(database_url, tmp_path):
    limit = _server_max_connections(database_url)
    result = run_pie(
        ["worker"],
        tmp_path,
        PIE_DATABASE_URL=database_url,
        PIE_DB_POOL_SIZE=str(limit),
        PIE_DB_MAX_OVERFLOW="2",
        PIE_DB_CHECK_CONNECTIONS="true",  # the kit turns it off for its other servers
        timeout=90,
    )
    line = assert_config_error_after_logs(result)
    assert line.startswith("pie worker: database connections: 1 process(es) x ")
    assert (
        f"(PIE_DB_POOL_SIZE {limit} + PIE_DB_MAX_OVERFLOW 2 + dispatcher 3 + webhook delivery 3) = {limit + 8} > "
        in line
    ), line


def test_the_check_can_be_turned_into_a_warning(database_url, tmp_path):
    """Behind PgBouncer a client connection is not a server connection: the operator turns the
    refusal off and gets the arithmetic as a warning."""
    limit = _server_max_connections(database_url)
    port = free_port()
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [*pie_command(), "serve", "--host", "127.0.0.1", "--port", str(port)],
            env=clean_subprocess_env(
                PIE_DATABASE_URL=database_url,
                PIE_DATA_DIR=str(tmp_path / "data"),
                PIE_JWT_SECRET="s",
                PIE_DB_POOL_SIZE=str(limit),
                PIE_DB_CHECK_CONNECTIONS="false",
                PIE_RUN_DISPATCHER="false",
            ),
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "pie serve did not start"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v2/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
    finally:
        process.terminate()
        process.wait(timeout=30)
    warnings = [line for line in log_path.read_text().splitlines() if " WARNING " in line and "process(es) x" in line]
    assert len(warnings) == 1 and "starting anyway (PIE_DB_CHECK_CONNECTIONS=false)" in warnings[0], warnings


def test_the_default_settings_pass_the_check(database_url, tmp_path):
    """The refusal is about the arithmetic, not a blanket one: the check itself with today's
    server state and small pools lets a start through."""
    from pie.startup import check_connection_budget

    settings = Settings(_env_file=None, db_pool_size=2, db_max_overflow=0, db_read_pool_size=1)
    check_connection_budget(database_url, settings, "serve", 1)  # raises ConfigError otherwise


def test_pool_variables_are_checked_like_every_other_setting(tmp_path):
    assert_config_error(run_pie(["serve", "--port", "0"], tmp_path, PIE_DB_READ_POOL_SIZE="0"), "PIE_DB_READ_POOL_SIZE")
    assert_config_error(
        run_pie(["serve", "--port", "0"], tmp_path, PIE_DB_CHECK_CONNECTIONS="perhaps"), "PIE_DB_CHECK_CONNECTIONS"
    )
