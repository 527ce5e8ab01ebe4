from __future__ import annotations

from fastapi import APIRouter

from pie.auth import Principal
from pie.deps import require
from pie.dispatch.inprocess import registered_names
from pie.routing import PieRoute

router = APIRouter(route_class=PieRoute, tags=["handlers"])


@router.get("/v2/handlers/in-process", operation_id="listinprocesshandlers", response_model=list[str])
async def list_in_process_handlers(principal: Principal = require("read_models")):
    """Names usable as ``{"type": "in_process", "value": <name>}`` handlers (a bare array)."""
    return registered_names()
