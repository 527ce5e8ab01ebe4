"""Test kit: a fresh PostgreSQL database per test session (PIE_TEST_DATABASE_URL's server, or an
embedded pgserver), migrated with Alembic; every test starts from empty tables."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

# settings for the code under test, before anything reads them
_TMP = tempfile.mkdtemp(prefix="pie-test-")
os.environ.update(
    {
        "PIE_JWT_SECRET": "test-secret-not-for-production",
        "PIE_JWT_ISSUER": "pie-dev",
        "PIE_RUN_DISPATCHER": "false",
        "PIE_PUBLIC_URL": "http://testserver",
        "PIE_DATA_DIR": _TMP,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
)
for _var in ("PIE_DATABASE_URL", "PIE_COGNITO_REGION", "PIE_COGNITO_USER_POOL_ID", "PIE_JWKS_URL", "AWS_ENDPOINT_URL"):
    os.environ.pop(_var, None)

import httpx  # noqa: E402
import psycopg  # noqa: E402
import pytest  # noqa: E402
from sqlalchemy import text  # noqa: E402
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
    import pgserver

    server = pgserver.get_server(os.path.join(_TMP, "pgdata"), cleanup_mode="stop")
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


@pytest.fixture(scope="session")
def settings() -> Settings:
    return get_settings()


@pytest.fixture(scope="session")
async def engine(database_url: str):
    engine = db.init_engine(database_url)
    yield engine
    await db.dispose_engine()


_TABLES = ", ".join(t.name for t in Base.metadata.sorted_tables)


@pytest.fixture(autouse=True)
async def _clean_tables(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """Every test that touches the database starts from empty tables."""
    if "engine" not in request.fixturenames:
        yield
        return
    yield
    async with db.get_engine().begin() as conn:
        await conn.execute(text(f"TRUNCATE {_TABLES} RESTART IDENTITY CASCADE"))


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
