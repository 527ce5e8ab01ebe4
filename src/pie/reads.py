"""Hot reads (README: Performance): one Core statement on a pooled connection in autocommit
(no ORM session, no identity map, no BEGIN/COMMIT round trips for a single read), and the
answer serialized once, by the response model's own pydantic-core serializer, into a
:class:`Response` that FastAPI sends as is (no second validation of a body built here).

Routes using these keep ``response_model=`` for the OpenAPI document; FastAPI skips its own
response validation for an endpoint that returns a ``Response``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi.responses import Response
from pydantic import BaseModel
from sqlalchemy.sql import Executable

from pie import db


async def fetch_one(stmt: Executable, params: Mapping[str, Any] | None = None) -> Mapping[str, Any] | None:
    """The first row of ``stmt`` as a mapping (None when there is none), read outside any
    transaction. Database errors surface as SQLAlchemy's (the 503 envelope; a broken connection
    is invalidated by the pool)."""
    async with db.get_engine().connect() as conn:
        await conn.execution_options(isolation_level="AUTOCOMMIT")
        return (await conn.execute(stmt, params)).mappings().first()


def json_response(model: type[BaseModel], data: Mapping[str, Any], status_code: int = 200) -> Response:
    """``data`` validated into ``model`` and serialized to JSON bytes in one pass (the same
    output FastAPI's ``response_model`` handling would produce)."""
    body = model.model_validate(data).model_dump_json(by_alias=True).encode()
    return Response(content=body, status_code=status_code, media_type="application/json")
