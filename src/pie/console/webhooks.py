"""The console's read-only view of a tenant's webhooks and their recent deliveries (spec 15.6),
over the logic the API routes call, with the API's rule (``manage_domains`` on the tenant)."""

from __future__ import annotations

from fastapi import Request
from starlette.responses import HTMLResponse

from pie.console.common import Cursor, Pager, User, console_router, render
from pie.deps import ClientIdPath, Session, tenant_scope
from pie.webhooks import logic as webhooks

RECENT = 10  # deliveries shown per webhook

router = console_router()


@router.get("/clients/{client_id}/webhooks", response_class=HTMLResponse)
async def webhooks_page(request: Request, client_id: ClientIdPath, user: User, session: Session, cursor: Cursor = None):
    scope = await tenant_scope(session, user.principal, client_id, "manage_domains")
    pager = Pager(request, cursor)
    rows = await webhooks.list_webhooks(session, scope.client_id, pager.params, pager.response)
    deliveries = await webhooks.recent_deliveries(session, [w.id for w in rows], RECENT)
    return render(
        request, "webhooks.html", client=scope.client, webhooks=rows, deliveries=deliveries, next_url=pager.next_url
    )
