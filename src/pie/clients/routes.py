from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Response
from sqlalchemy.ext.asyncio import AsyncSession

from pie.audit.routing import AuditedRoute
from pie.auth import Principal
from pie.clients import logic
from pie.clients.schemas import ClientCreate, ClientOut, ClientUpdate
from pie.deps import ClientIdPath, Session, TenantScope, require, tenant
from pie.errors import error_responses
from pie.idempotency import IDEMPOTENT
from pie.pagination import ListParams, PageParams, complete_list
from pie.tables.clients import Client

router = APIRouter(prefix="/v2/clients", tags=["clients"], route_class=AuditedRoute)


@router.get("", operation_id="listclients", response_model=list[ClientOut])
async def list_clients(
    session: Session,
    response: Response,
    page: Annotated[ListParams, Depends()],
    principal: Principal = require("read_domains"),
):
    """Clients the caller may access (admins: all), ordered by `client_id`: a bare JSON array of
    every one, unless `?limit=` (or `?cursor=`) asks for a page (the next page's cursor then
    comes back in `X-Next-Cursor`)."""

    async def read(s: AsyncSession, p: PageParams, r: Response) -> list[Client]:
        return await logic.list_clients(s, principal, p, r)

    return await complete_list(session, page, response, ClientOut, read)


_NOT_FOUND = "no client with this client_id"


@router.post(
    "",
    operation_id="createclient",
    dependencies=[IDEMPOTENT],
    response_model=ClientOut,
    status_code=201,
    responses=error_responses(
        e409="a client with this client_id already exists, the client_id is an app client id, or an app client "
        "id belongs to another client or is a client id"
    ),
)
async def create_client(body: ClientCreate, session: Session, principal: Principal = require("admin")):
    """Register a tenant (admin only). 409 if `client_id` exists or is already one of a
    client's `app_client_ids`, or one of `app_client_ids` belongs to another client or is a
    client id (client ids and app client ids are one namespace)."""
    return await logic.create_client(session, body)


@router.get(
    "/{client_id}", operation_id="getclient", response_model=ClientOut, responses=error_responses(e404=_NOT_FOUND)
)
async def get_client(session: Session, scope: TenantScope = tenant("read_domains")):
    """One client the caller may access."""
    return await logic.get_client(session, scope.client_id)


@router.patch(
    "/{client_id}",
    operation_id="updateclient",
    response_model=ClientOut,
    responses=error_responses(e404=_NOT_FOUND, e409="an app client id belongs to another client or is a client id"),
)
async def update_client(
    client_id: ClientIdPath, body: ClientUpdate, session: Session, principal: Principal = require("admin")
):
    """Rename, suspend or reactivate a client, or replace its `app_client_ids` (admin only). A
    suspended client can still be read; writes and job launches under it are 422."""
    return await logic.update_client(session, client_id, body)
