"""Keyset pagination for list routes: ``?limit=`` and ``?cursor=``; next cursor in ``X-Next-Cursor``.

The documented bare-array lists (spec 15.2: listclients, listmodels, getdomainfeatures,
listmodeleventsubscriptions) take :class:`ListParams`: without ``?limit=`` or ``?cursor=`` they
answer every row (:func:`complete_list`). A list longer than one internal page is streamed: the
first page is read in the request's transaction, each further page by the same read function
on a session of its own, serialized and sent before the next is read, so no more than a page of
rows is held at a time (not the whole list, let alone twice).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any

from fastapi import Query, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from sqlalchemy import BigInteger, Integer, Select, SmallInteger, literal, tuple_
from sqlalchemy.ext.asyncio import AsyncSession

from pie import db
from pie.errors import BadRequest
from pie.schemas import unstorable_json

log = logging.getLogger("pie.pagination")

NEXT_CURSOR_HEADER = "X-Next-Cursor"
DEFAULT_LIMIT = 100
# rows per internal page of a complete list (each page is one query, serialized and sent
# before the next is read)
STREAM_PAGE = 1000


class PageParams:
    def __init__(
        self,
        limit: Annotated[int, Query(ge=1, le=1000, description="page size (max 1000)")] = DEFAULT_LIMIT,
        cursor: Annotated[str | None, Query(max_length=2048, description="from X-Next-Cursor")] = None,
    ):
        self.limit = limit
        self.cursor = cursor

    def decode(self) -> list[Any] | None:
        if not self.cursor:
            return None
        try:
            padded = self.cursor + "=" * (-len(self.cursor) % 4)
            values = json.loads(base64.urlsafe_b64decode(padded.encode()))
        except (ValueError, UnicodeDecodeError, binascii.Error) as exc:
            raise BadRequest("invalid cursor") from exc
        if not isinstance(values, list):
            raise BadRequest("invalid cursor")
        return values


def _cursor_value(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)  # uuid, Decimal, ...


def encode_cursor(values: Sequence[Any]) -> str:
    raw = json.dumps([_cursor_value(v) for v in values], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _python_type(column: Any) -> type | None:
    try:
        return column.type.python_type
    except (AttributeError, NotImplementedError):
        return None


def _integer_bits(column: Any) -> int:
    """Width of an integer key column (PostgreSQL refuses larger values with an error)."""
    column_type = getattr(column, "type", None)
    for kind, bits in ((SmallInteger, 16), (BigInteger, 64), (Integer, 32)):
        if isinstance(column_type, kind):
            return bits
    return 64


def _typed(column: Any, value: Any) -> Any:
    """A cursor value converted to the key column's Python type; BadRequest when it cannot be
    (also for values the column cannot hold: out-of-range integers, text PostgreSQL cannot store)."""
    kind = _python_type(column)
    try:
        if kind is None:
            if unstorable_json(value) is not None:
                raise BadRequest("invalid cursor")
            return value
        if kind is int and isinstance(value, (int, str)) and not isinstance(value, bool):
            number = int(value)
            bound = 1 << (_integer_bits(column) - 1)
            if not -bound <= number < bound:
                raise BadRequest("invalid cursor")
            return number
        if kind is str and isinstance(value, str) and unstorable_json(value) is None:
            return value
        if kind is uuid.UUID and isinstance(value, str):
            return uuid.UUID(value)
        if kind is datetime and isinstance(value, str):
            return datetime.fromisoformat(value)
        if kind is Decimal and isinstance(value, (int, str)) and not isinstance(value, bool):
            decimal = Decimal(value)
            # PostgreSQL numeric: at most 131072 digits before the point and 16383 after
            if decimal.is_finite() and (decimal.is_zero() or -16383 <= decimal.adjusted() < 131072):
                return decimal
    except (ValueError, ArithmeticError) as exc:
        raise BadRequest("invalid cursor") from exc
    raise BadRequest("invalid cursor")


async def paginate(
    session: AsyncSession,
    stmt: Select[Any],
    keys: Sequence[Any],
    page: PageParams,
    response: Response,
    *,
    descending: bool = False,
) -> list[Any]:
    """Run ``stmt`` (selecting one ORM entity) ordered by the unique, non-null ``keys`` columns
    (ORM attributes of that entity: text, integer, uuid or timestamp), one page."""
    after = page.decode()
    if after is not None:
        if len(after) != len(keys):
            raise BadRequest("invalid cursor")
        bound = tuple_(*[literal(_typed(k, v), type_=k.type) for k, v in zip(keys, after)])
        cond = tuple_(*keys) < bound if descending else tuple_(*keys) > bound
        stmt = stmt.where(cond)
    order = [k.desc() for k in keys] if descending else list(keys)
    rows = list((await session.scalars(stmt.order_by(*order).limit(page.limit + 1))).all())
    if len(rows) > page.limit:
        rows = rows[: page.limit]
        last = rows[-1]
        response.headers[NEXT_CURSOR_HEADER] = encode_cursor([getattr(last, k.key) for k in keys])
    return rows


# -- complete lists (spec 15.2) --------------------------------------------------------------------


class ListParams:
    """``?limit=`` and ``?cursor=`` of a complete list: without either, every row; with either,
    one page as on the other lists (``limit`` defaults to 100 when only ``cursor`` is given)."""

    def __init__(
        self,
        limit: Annotated[
            int | None,
            Query(ge=1, le=1000, description="page size (max 1000); without limit and cursor, every row is answered"),
        ] = None,
        cursor: Annotated[str | None, Query(max_length=2048, description="from X-Next-Cursor")] = None,
    ):
        self.limit = limit
        self.cursor = cursor

    @property
    def paged(self) -> bool:
        return self.limit is not None or self.cursor is not None

    def page(self) -> PageParams:
        return PageParams(limit=self.limit if self.limit is not None else DEFAULT_LIMIT, cursor=self.cursor)


# a list's read: one page of rows (ORM entities or mappings) for these page parameters, the next
# cursor set on the response (the logic's own list function, e.g. ``list_models``)
PageReader = Callable[[AsyncSession, PageParams, Response], Awaitable[Sequence[Any]]]


def _json_rows(model: type[BaseModel], rows: Sequence[Any]) -> bytes:
    """The rows as the route's ``response_model`` renders them, comma-separated (no brackets)."""
    return b",".join(model.model_validate(row).model_dump_json(by_alias=True).encode() for row in rows)


async def complete_list(
    session: AsyncSession, params: ListParams, response: Response, model: type[BaseModel], read: PageReader
) -> Sequence[Any] | StreamingResponse:
    """One page when ``params`` asks for one; else every row: a list that fits one internal page
    as it is (the route renders it), a longer one as a streamed JSON array of ``model`` objects.

    The first page is read here, in the request's transaction, so every 4xx (and a database
    error) is answered as usual; the following pages are read by ``read`` on sessions of their
    own while the answer is sent. Pages are keyset pages: rows written while the list streams
    may or may not appear, no row appears twice. An error after the answer began ends the
    connection without the closing bracket (the client sees a truncated body, never a short
    list that looks complete)."""
    if params.paged:
        return await read(session, params.page(), response)
    first = Response()
    rows = await read(session, PageParams(limit=STREAM_PAGE), first)
    cursor = first.headers.get(NEXT_CURSOR_HEADER)
    if cursor is None:
        return rows
    head = _json_rows(model, rows)
    del rows
    return StreamingResponse(_rest_of(head, cursor, model, read), media_type="application/json")


async def _rest_of(head: bytes, cursor: str | None, model: type[BaseModel], read: PageReader) -> AsyncIterator[bytes]:
    yield b"[" + head
    try:
        while cursor is not None:
            page = Response()
            async with db.sessionmaker()() as session:
                chunk = _json_rows(model, await read(session, PageParams(limit=STREAM_PAGE, cursor=cursor), page))
            cursor = page.headers.get(NEXT_CURSOR_HEADER)
            if chunk:
                yield b"," + chunk
    except Exception:
        log.exception("a complete list failed after its answer began; the answer is cut short")
        raise
    yield b"]"


def page_of_list(items: list[Any], params: ListParams, response: Response) -> list[Any]:
    """A complete list held in one stored value (a domain's feature definitions): every item,
    or with ``?limit=`` / ``?cursor=`` one page by position (the cursor names how many items
    came before it)."""
    if not params.paged:
        return items
    page = params.page()
    after = page.decode()
    start = 0
    if after is not None:
        if len(after) != 1 or isinstance(after[0], bool) or not isinstance(after[0], int) or after[0] < 0:
            raise BadRequest("invalid cursor")
        start = after[0]
    end = start + page.limit
    if end < len(items):
        response.headers[NEXT_CURSOR_HEADER] = encode_cursor([end])
    return items[start:end]
