"""Async engine, the per-request unit of work, and the declarative base."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import psycopg
import psycopg.conninfo
from psycopg_pool import AsyncConnectionPool
from sqlalchemy import DateTime, MetaData, func
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSONB, list[Any]: JSONB, datetime: DateTime(timezone=True)}


class Timestamps:
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now(), onupdate=func.now())


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def async_url(url: str) -> str:
    """Normalise any PostgreSQL URL to the psycopg 3 async driver."""
    for prefix in (
        "postgresql+psycopg://",
        "postgresql+psycopg2://",
        "postgresql+asyncpg://",
        "postgresql://",
        "postgres://",
    ):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def libpq_url(url: str) -> str:
    """The same URL in the plain libpq form (for psycopg.connect / LISTEN)."""
    for prefix in ("postgresql+psycopg://", "postgresql+psycopg2://", "postgresql+asyncpg://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql://" + url[len(prefix) :]
    return url


class GuardedConnection(psycopg.AsyncConnection):
    """A psycopg connection that gives up on a server that does not answer at all.

    PostgreSQL's own ``statement_timeout`` and ``lock_timeout`` end slow statements, but a frozen
    or unreachable server (SIGSTOP, a network black hole) answers nothing, not even the cancel:
    every wait on the socket is bounded by ``response_timeout`` seconds, after which the
    connection is closed and an ``OperationalError`` raised (the request gets the 503 envelope,
    the pool discards the connection)."""

    response_timeout: float | None = None

    async def wait(self, gen: Any, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("timeout") is None and self.response_timeout:
            kwargs["timeout"] = self.response_timeout
        try:
            return await super().wait(gen, *args, **kwargs)
        except _WAIT_TIMEOUT:
            self.pgconn.finish()
            raise psycopg.OperationalError(
                f"the database did not answer within {kwargs['timeout']:g} seconds; connection closed"
            ) from None


_WAIT_TIMEOUT: Any = getattr(psycopg.errors, "_WaitTimeout", ())


def _driver_options(settings: Any) -> tuple[dict[str, Any], float | None]:
    """psycopg connection keywords carrying the database timeouts of ``settings`` (libpq
    ``connect_timeout``; the server-side ``statement_timeout`` and ``lock_timeout``) and the
    client-side response guard of :class:`GuardedConnection` (statement + connect timeout)."""
    options = []
    if settings.db_statement_timeout_ms:
        options.append(f"-c statement_timeout={int(settings.db_statement_timeout_ms)}")
    if settings.db_lock_timeout_ms:
        options.append(f"-c lock_timeout={int(settings.db_lock_timeout_ms)}")
    args: dict[str, Any] = {}
    if options:
        args["options"] = " ".join(options)
    if settings.db_connect_timeout:
        args["connect_timeout"] = max(1, math.ceil(settings.db_connect_timeout))
    guard = None
    if settings.db_statement_timeout_ms:
        guard = settings.db_statement_timeout_ms / 1000 + max(settings.db_connect_timeout, 1.0)
    return args, guard


def connect_args(settings: Any) -> dict[str, Any]:
    """psycopg connection arguments carrying the database timeouts of ``settings``:
    ``connect_timeout`` (libpq, whole seconds, at least 1 when set), the server-side
    ``statement_timeout`` and ``lock_timeout``, and the client-side response guard
    (statement timeout + connect timeout) of :class:`GuardedConnection`."""
    args, guard = _driver_options(settings)

    async def connect(*a: Any, **kw: Any) -> GuardedConnection:
        conn = await GuardedConnection.connect(*a, **kw)
        conn.response_timeout = guard
        return conn

    args["async_creator_fn"] = connect
    return args


async def connect(settings: Any, **kwargs: Any) -> GuardedConnection:
    """A connection of its own (outside the pool) to the engine's database, with the same
    timeouts as the pool's connections (``connect_args``); ``kwargs`` go to psycopg
    (e.g. ``autocommit=True``, ``row_factory``)."""
    args = connect_args(settings)
    creator = args.pop("async_creator_fn")
    return await creator(get_database_url(), **args, **kwargs)


_engine: AsyncEngine | None = None
_sessionmaker: async_sessionmaker[AsyncSession] | None = None
_url: str | None = None
_read_pool: AsyncConnectionPool[Any] | None = None
_read_pool_opened = False
READ_POOL_NAME = "pie-reads"


def _make_read_pool(url: str, settings: Any) -> AsyncConnectionPool[Any]:
    """The connections of single-statement reads (``pie.reads``): psycopg's own pool, in
    autocommit (one round trip per read, no transaction state to reset), with the engine's
    timeouts and the engine's JSON loader (stored values of any depth load). Opened on first
    use; a connection that breaks is discarded by the pool when it comes back."""
    from psycopg.adapt import AdaptersMap
    from psycopg.types.json import set_json_loads

    from pie.jsonbody import load_stored

    url = libpq_url(url)
    kwargs, guard = _driver_options(settings)
    if "application_name" not in psycopg.conninfo.conninfo_to_dict(url):
        kwargs["application_name"] = READ_POOL_NAME  # tells its sessions apart in pg_stat_activity
    adapters = AdaptersMap(psycopg.adapters)
    set_json_loads(load_stored, adapters)

    async def configure(conn: GuardedConnection) -> None:
        conn.response_timeout = guard

    return AsyncConnectionPool(
        url,
        connection_class=GuardedConnection,
        kwargs={**kwargs, "autocommit": True, "context": adapters},
        configure=configure,
        min_size=0,
        max_size=settings.db_read_pool_size,
        # a checkout waits at most as long as a connection attempt may take
        timeout=max(settings.db_connect_timeout, 1.0),
        max_lifetime=settings.db_pool_recycle_seconds or 10 * 365 * 86400.0,  # 0: never
        open=False,
        name=READ_POOL_NAME,
    )


async def read_pool() -> AsyncConnectionPool[Any]:
    """The reads' pool of the current engine (see ``_make_read_pool``), opened on first use."""
    global _read_pool_opened
    if _read_pool is None:
        raise RuntimeError("database engine not initialised; call pie.db.init_engine()")
    if not _read_pool_opened:
        await _read_pool.open()
        _read_pool_opened = True
    return _read_pool


def init_engine(url: str, settings: Any = None, **kwargs: Any) -> AsyncEngine:
    """Create (or replace) the process-wide engine (pool size and timeouts from ``settings``,
    default the process settings)."""
    global _engine, _sessionmaker, _url, _read_pool, _read_pool_opened
    from pie.config import get_settings

    settings = settings or get_settings()
    kwargs.setdefault("pool_size", settings.db_pool_size)
    kwargs.setdefault("max_overflow", settings.db_max_overflow)
    # no per-checkout pre-ping (a round trip on every request): connections are recycled after
    # PIE_DB_POOL_RECYCLE_SECONDS, and a connection that fails with a disconnect error is
    # invalidated by SQLAlchemy (that request gets the 503 envelope; the next checkout opens a
    # fresh connection) -- error-driven reconnect
    kwargs.setdefault("pool_pre_ping", False)
    kwargs.setdefault("pool_recycle", settings.db_pool_recycle_seconds or -1)
    kwargs.setdefault("connect_args", connect_args(settings))
    from pie.jsonbody import load_stored

    kwargs.setdefault("json_deserializer", load_stored)  # any stored depth loads
    _url = libpq_url(url)
    _engine = create_async_engine(async_url(url), **kwargs)
    _read_pool, _read_pool_opened = _make_read_pool(url, settings), False
    _sessionmaker = async_sessionmaker(_engine, expire_on_commit=False, autoflush=True)
    return _engine


def get_engine() -> AsyncEngine:
    if _engine is None:
        raise RuntimeError("database engine not initialised; call pie.db.init_engine()")
    return _engine


def get_database_url() -> str:
    if _url is None:
        raise RuntimeError("database engine not initialised")
    return _url


def sessionmaker() -> async_sessionmaker[AsyncSession]:
    if _sessionmaker is None:
        raise RuntimeError("database engine not initialised; call pie.db.init_engine()")
    return _sessionmaker


@dataclass(frozen=True)
class EngineState:
    engine: AsyncEngine | None
    sessionmaker: async_sessionmaker[AsyncSession] | None
    url: str | None
    read_pool: AsyncConnectionPool[Any] | None
    read_pool_opened: bool


def save_engine() -> EngineState:
    """The process-wide engine and reads' pool, to put back with ``restore_engine`` (tests that
    point the process at another database for a while)."""
    return EngineState(_engine, _sessionmaker, _url, _read_pool, _read_pool_opened)


def restore_engine(state: EngineState) -> None:
    global _engine, _sessionmaker, _url, _read_pool, _read_pool_opened
    _engine, _sessionmaker, _url = state.engine, state.sessionmaker, state.url
    _read_pool, _read_pool_opened = state.read_pool, state.read_pool_opened


async def dispose_engine() -> None:
    global _engine, _sessionmaker, _read_pool, _read_pool_opened
    if _engine is not None:
        await _engine.dispose()
    if _read_pool is not None and _read_pool_opened:
        await _read_pool.close()
    _engine = None
    _sessionmaker = None
    _read_pool, _read_pool_opened = None, False


async def get_session() -> AsyncIterator[AsyncSession]:
    """The unit of work: one transaction per request, committed when the endpoint returns.

    Logic functions flush, never commit. Declared with ``Depends(get_session, scope="function")``
    (see ``pie.deps.Session``) so the commit happens before the response is sent.
    """
    async with sessionmaker()() as session, session.begin():
        yield session
