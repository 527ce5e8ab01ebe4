"""Clients (tenants): the list and a client's page."""

from __future__ import annotations

from fastapi import Request
from starlette.responses import HTMLResponse

from pie.clients import logic as clients
from pie.console.common import Cursor, Pager, User, console_router, render
from pie.deps import ClientIdPath, Session, tenant_scope
from pie.tenancy import logic as tenancy

router = console_router()


@router.get("/clients", response_class=HTMLResponse)
async def clients_page(request: Request, user: User, session: Session, cursor: Cursor = None):
    user.principal.require("read_domains")
    pager = Pager(request, cursor)
    rows = await clients.list_clients(session, user.principal, pager.params, pager.response)
    return render(request, "clients.html", clients=rows, next_url=pager.next_url)


@router.get("/clients/{client_id}", response_class=HTMLResponse)
async def client_page(request: Request, client_id: ClientIdPath, user: User, session: Session, cursor: Cursor = None):
    scope = await tenant_scope(session, user.principal, client_id, "read_domains")
    pager = Pager(request, cursor)
    domains = await tenancy.list_domains(session, scope, pager.params, pager.response)
    return render(request, "client.html", client=scope.client, domains=domains, next_url=pager.next_url)
