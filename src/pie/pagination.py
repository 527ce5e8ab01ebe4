"""Keyset pagination for list routes: ``?limit=`` and ``?cursor=``; next cursor in ``X-Next-Cursor``."""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any

from fastapi import Query, Response
from sqlalchemy import BigInteger, Integer, Select, SmallInteger, literal, tuple_
from sqlalchemy.ext.asyncio import AsyncSession

from pie.errors import BadRequest
from pie.schemas import unstorable_json

NEXT_CURSOR_HEADER = "X-Next-Cursor"


class PageParams:
    def __init__(
        self,
        limit: Annotated[int, Query(ge=1, le=1000, description="page size (max 1000)")] = 100,
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
