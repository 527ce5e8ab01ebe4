from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import Field

from pie.auth import Principal
from pie.deps import require
from pie.dispatch.inprocess import ENTRY_POINT_GROUP, registrations
from pie.http.routing import PieRoute
from pie.schemas import ResponseBody

router = APIRouter(route_class=PieRoute, tags=["handlers"])


class InProcessHandlerOut(ResponseBody):
    name: str
    source: str = Field(
        description="builtin (shipped with PIE), entry_point (an installed distribution's "
        f"'{ENTRY_POINT_GROUP}' entry point) or code (registered by other code in the process)"
    )
    target: str = Field(description="module:object of the implementation")
    distribution: str | None = Field(default=None, description="the distribution providing it")
    usable: bool = Field(description="false when the entry point failed to load (see error)")
    error: str | None = None


@router.get(
    "/v2/handlers/in-process",
    operation_id="listinprocesshandlers",
    response_model=list[str] | list[InProcessHandlerOut],
)
async def list_in_process_handlers(
    principal: Principal = require("read_models"),
    details: Annotated[bool, Query(description="objects with each implementation's source instead of names")] = False,
):
    """Names usable as ``{"type": "in_process", "value": <name>}`` handlers (a bare array): the
    built-ins and the implementations installed distributions provide through the
    ``pie.handlers`` entry-point group. ``?details=true`` answers objects naming each one's
    source (including entry points that failed to load, ``usable: false``)."""
    found = registrations()
    if details:
        return [r.describe() for r in found]
    return [r.name for r in found if r.implementation is not None]
