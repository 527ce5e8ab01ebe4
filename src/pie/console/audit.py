"""The audit log page (``GET /v2/audit`` as a page)."""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import Query, Request
from starlette.responses import HTMLResponse

from pie.audit import logic as audit
from pie.console.common import Cursor, Pager, User, console_router, parse_time, render, templates
from pie.deps import Session
from pie.errors import BadRequest
from pie.schemas import ID_PATTERN

router = console_router()

AUDIT_TARGET_TYPES = ("client", "domain", "service", "assignment", "model", "model_version", "subscription", "job")
AUDIT_FILTERS = {  # name -> (pattern of GET /v2/audit, label in messages)
    "client": (ID_PATTERN, "client"),
    "target_type": (r"^[a-z_]{1,32}$", "target type"),
    "target_id": (r"^.{1,512}$", "target id"),
    "actor": (r"^.{1,512}$", "actor"),
    "action": (r"^[a-z]{1,64}$", "action"),
}
FilterText = Annotated[str | None, Query(max_length=512)]


def target_url(record: Any) -> str | None:
    """The console page of an audit row's target, when it has one."""
    kind, target, tenant = record.target_type, record.target_id, record.client_id
    if not target:
        return "/console/clients/" + tenant if kind == "client" and tenant else None
    parts = target.split("/")
    if kind == "client":
        return f"/console/clients/{target}"
    if kind == "model":
        return f"/console/models/{target}"
    if kind == "model_version" and len(parts) == 2:
        return f"/console/models/{parts[0]}/versions/{parts[1]}"
    if kind == "job":
        return f"/console/jobs/{target}"
    if tenant is None:
        return None
    base = f"/console/clients/{tenant}/domains/{parts[0]}"
    if kind == "domain":
        return base
    if kind == "service" and len(parts) == 2:
        return f"{base}/services/{parts[1]}"
    if kind == "assignment" and len(parts) == 2:
        return f"{base}/assignments/{parts[1]}"
    if kind == "assignment" and len(parts) == 3:
        return f"{base}/services/{parts[1]}/assignments/{parts[2]}"
    return None


templates.env.filters["target_url"] = target_url


@router.get("/audit", response_class=HTMLResponse)
async def audit_page(
    request: Request,
    user: User,
    session: Session,
    client: FilterText = None,
    target_type: FilterText = None,
    target_id: FilterText = None,
    actor: FilterText = None,
    action: FilterText = None,
    occurred_after: Annotated[str | None, Query(max_length=40)] = None,
    occurred_before: Annotated[str | None, Query(max_length=40)] = None,
    cursor: Cursor = None,
):
    """``GET /v2/audit`` as a page: the same permission (``read_domains``) and tenant rules
    (admins every row; others the rows of their tenants; 403 for a caller without any)."""
    user.principal.require("read_domains")
    given = {"client": client, "target_type": target_type, "target_id": target_id, "actor": actor, "action": action}
    values: dict[str, str | None] = {}
    for name, value in given.items():
        value = (value or "").strip() or None
        pattern, label = AUDIT_FILTERS[name]
        if value is not None and not re.fullmatch(pattern, value):
            raise BadRequest(f"{label}: not a valid value ({value[:80]!r})")
        values[name] = value
    pager = Pager(request, cursor)
    rows = await audit.list_audit(
        session,
        user.principal,
        pager.params,
        pager.response,
        client_id=values["client"],
        target_type=values["target_type"],
        target_id=values["target_id"],
        actor=values["actor"],
        action=values["action"],
        after=parse_time("occurred after", occurred_after),
        before=parse_time("occurred before", occurred_before),
    )
    filters = {name: value or "" for name, value in values.items()}
    filters.update(occurred_after=occurred_after or "", occurred_before=occurred_before or "")
    return render(
        request, "audit.html", records=rows, filters=filters, target_types=AUDIT_TARGET_TYPES, next_url=pager.next_url
    )
