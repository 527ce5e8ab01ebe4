"""``GET /v2/audit``: the audit log, newest first."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Response

from pie.audit import logic
from pie.audit.schemas import AuditRecordOut
from pie.auth import Principal
from pie.deps import Session, require
from pie.errors import error_responses
from pie.http.routing import PieRoute
from pie.pagination import PageParams
from pie.schemas import ID_PATTERN

router = APIRouter(route_class=PieRoute, tags=["audit"])

# free text, but never a NUL character (PostgreSQL's text cannot hold one: a 400, not a 500)
Text = Annotated[str | None, Query(min_length=1, max_length=512, pattern=r"^[^\x00]+$")]


@router.get(
    "/v2/audit",
    operation_id="listauditrecords",
    response_model=list[AuditRecordOut],
    responses=error_responses(e403="neither admin nor access to a client (or to the `client_id` asked for)"),
)
async def list_audit(
    session: Session,
    response: Response,
    page: Annotated[PageParams, Depends()],
    principal: Principal = require("read_domains"),
    client_id: Annotated[str | None, Query(pattern=ID_PATTERN, description="only this tenant's rows")] = None,
    target_type: Annotated[str | None, Query(pattern=r"^[a-z_]{1,32}$", description="e.g. `assignment`")] = None,
    target_id: Text = None,
    actor: Text = None,
    action: Annotated[str | None, Query(pattern=r"^[a-z]{1,64}$", description="an operation id")] = None,
    occurred_after: Annotated[datetime | None, Query(description="inclusive, ISO 8601")] = None,
    occurred_before: Annotated[datetime | None, Query(description="exclusive, ISO 8601")] = None,
):
    """Every write (one row each, written in the write's transaction), newest first; a bare
    array, next page via `X-Next-Cursor`. Needs `read_domains`: admins see all rows; other
    callers the rows of the clients they may access (platform rows — models, versions, direct
    inference — are for admins). `actor` matches the actor's `sub`, `username` or `client_id`."""
    return await logic.list_audit(
        session,
        principal,
        page,
        response,
        client_id=client_id,
        target_type=target_type,
        target_id=target_id,
        actor=actor,
        action=action,
        after=occurred_after,
        before=occurred_before,
    )
