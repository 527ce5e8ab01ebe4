"""Hot reads (README: Performance): one statement on an autocommit connection (no ORM session,
no identity map, no BEGIN/COMMIT round trips for a single read), and the answer serialized
once, by the response model's own pydantic-core serializer.

The statement is a SQLAlchemy Core construct compiled once for the engine's dialect; it runs on
a connection of the reads' own pool (``pie.db.read_pool``: psycopg's pool, autocommit, the
engine's timeouts and JSON loader), which costs a fraction of a SQLAlchemy checkout plus two
autocommit switches. ``before_cursor_execute`` listeners of the engine are called (with no
connection or execution context), so statement counters still see it. A database error is
raised as SQLAlchemy's wrapped exception (the 503 envelope of ``pie.errors``); a connection it
broke is discarded by the pool when it comes back.

Routes using :func:`json_response` keep ``response_model=`` for the OpenAPI document; FastAPI
skips its own response validation for an endpoint that returns a ``Response``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import psycopg
from fastapi.responses import Response
from psycopg.rows import dict_row
from pydantic import BaseModel
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql import ClauseElement

from pie import db, metrics

_compiled: dict[tuple[int, int], tuple[str, dict[str, Any]]] = {}


def compiled_sql(stmt: ClauseElement) -> tuple[str, dict[str, Any]]:
    """The statement's SQL for the engine's dialect and the values of its constant binds
    (compiled once per statement object: pass module-level constants)."""
    engine = db.get_engine()
    key = (id(stmt), id(engine.dialect))
    found = _compiled.get(key)
    if found is None:
        compiled = stmt.compile(dialect=engine.dialect)
        found = _compiled[key] = (str(compiled), dict(compiled.params))
    return found


def announce(conn: AsyncConnection | None, cursor: Any, sql: str, params: Any) -> None:
    """Call the engine's ``before_cursor_execute`` listeners (statement counters) for a
    statement run on a driver connection directly (``conn``: the engine connection it belongs
    to; None for the reads' own pool)."""
    engine = db.get_engine().sync_engine
    listeners = engine.dispatch.before_cursor_execute
    if listeners:
        for listener in listeners:
            listener(conn.sync_connection if conn is not None else None, cursor, sql, params, None, False)


async def fetch_one(stmt: ClauseElement, params: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """The first row of ``stmt`` (a module-level constant: its SQL is compiled once) as a dict
    (None when there is none), read outside any transaction on an autocommit connection of the
    reads' pool (``pie.db.read_pool``)."""
    sql, constants = compiled_sql(stmt)
    params = {**constants, **(params or {})}
    try:
        pool = await db.read_pool()
        async with pool.connection() as pg:
            metrics.DB_POOL_IN_USE.inc()
            try:
                cur = pg.cursor(row_factory=dict_row)
                announce(None, cur, sql, params)
                await cur.execute(sql, params)
                return await cur.fetchone()
            finally:
                metrics.DB_POOL_IN_USE.dec()
    except psycopg.Error as exc:  # PoolTimeout included (an OperationalError)
        raise sa_exc.DBAPIError.instance(sql, params, exc, psycopg.Error) from exc


def json_response(model: type[BaseModel], data: Mapping[str, Any], status_code: int = 200) -> Response:
    """``data`` validated into ``model`` and serialized to JSON bytes in one pass (the same
    output FastAPI's ``response_model`` handling would produce)."""
    return Response(content=json_bytes(model, data), status_code=status_code, media_type="application/json")


def json_bytes(model: type[BaseModel], data: Mapping[str, Any]) -> bytes:
    return model.model_validate(data).model_dump_json(by_alias=True).encode()
