"""Registry tenants: plain functions over a session; they flush, never commit."""

from __future__ import annotations

from fastapi import Response
from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from pie.auth import Principal
from pie.clients.models import Client
from pie.clients.schemas import ClientCreate, ClientUpdate
from pie.errors import Conflict, NotFound
from pie.pagination import PageParams, paginate


def visible_clients(principal: Principal):
    stmt = select(Client)
    if not principal.is_admin:
        stmt = stmt.where(Client.client_id.in_(sorted(principal.tenants)))
    return stmt


async def list_clients(session: AsyncSession, principal: Principal, page: PageParams, response: Response) -> list[Client]:
    return await paginate(session, visible_clients(principal), [Client.client_id], page, response)


async def get_client(session: AsyncSession, client_id: str, *, for_update: bool = False) -> Client:
    stmt = select(Client).where(Client.client_id == client_id)
    if for_update:
        stmt = stmt.with_for_update()
    client = await session.scalar(stmt)
    if client is None:
        raise NotFound(f"client {client_id} not found")
    return client


async def create_client(session: AsyncSession, body: ClientCreate) -> Client:
    stmt = (
        insert(Client)
        .values(client_id=body.client_id, name=body.name)
        .on_conflict_do_nothing(index_elements=[Client.client_id])
        .returning(Client)
    )
    client = await session.scalar(stmt)
    if client is None:
        raise Conflict(f"client {body.client_id} already exists")
    return client


async def update_client(session: AsyncSession, client_id: str, body: ClientUpdate) -> Client:
    client = await get_client(session, client_id, for_update=True)
    changed = False
    if body.name is not None and body.name != client.name:
        client.name = body.name
        changed = True
    if body.status is not None and body.status != client.status:
        client.status = body.status
        changed = True
    if changed:
        await session.flush()
        await session.refresh(client)  # the server-side updated_at
    return client
