"""Keyset pagination for list routes: ``?limit=`` and ``?cursor=``; next cursor in ``X-Next-Cursor``."""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from typing import Annotated, Any

from fastapi import Query, Response
from sqlalchemy import Select, tuple_
from sqlalchemy.ext.asyncio import AsyncSession

from pie.errors import BadRequest

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
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadRequest("invalid cursor") from exc
        if not isinstance(values, list):
            raise BadRequest("invalid cursor")
        return values


def encode_cursor(values: Sequence[Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps([str(v) for v in values]).encode()).decode().rstrip("=")


async def paginate(
    session: AsyncSession,
    stmt: Select[Any],
    keys: Sequence[Any],
    page: PageParams,
    response: Response,
    *,
    descending: bool = False,
) -> list[Any]:
    """Run ``stmt`` (selecting one ORM entity) ordered by the unique ``keys`` columns, one page."""
    after = page.decode()
    if after is not None:
        if len(after) != len(keys):
            raise BadRequest("invalid cursor")
        cond = tuple_(*keys) < tuple_(*after) if descending else tuple_(*keys) > tuple_(*after)
        stmt = stmt.where(cond)
    order = [k.desc() for k in keys] if descending else list(keys)
    rows = list((await session.scalars(stmt.order_by(*order).limit(page.limit + 1))).all())
    if len(rows) > page.limit:
        rows = rows[: page.limit]
        last = rows[-1]
        response.headers[NEXT_CURSOR_HEADER] = encode_cursor([getattr(last, k.key) for k in keys])
    return rows
