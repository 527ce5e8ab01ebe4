"""Registry tenants: plain functions over a session; they flush, never commit."""

from __future__ import annotations

from fastapi import Response
from sqlalchemy import delete, func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import selectinload

from pie.auth import Principal
from pie.clients.app_clients import forget_on_commit
from pie.clients.models import Client, ClientAppClient
from pie.clients.schemas import ClientCreate, ClientUpdate
from pie.errors import Conflict, NotFound
from pie.pagination import PageParams, paginate


def visible_clients(principal: Principal):
    stmt = select(Client).options(selectinload(Client.app_clients))
    if not principal.is_admin:
        stmt = stmt.where(Client.client_id.in_(sorted(principal.tenants)))
    return stmt


async def list_clients(
    session: AsyncSession, principal: Principal, page: PageParams, response: Response
) -> list[Client]:
    return await paginate(session, visible_clients(principal), [Client.client_id], page, response)


async def get_client(session: AsyncSession, client_id: str, *, for_update: bool = False) -> Client:
    stmt = (
        select(Client)
        .where(Client.client_id == client_id)
        .options(selectinload(Client.app_clients))
        .execution_options(populate_existing=True)
    )
    if for_update:
        stmt = stmt.with_for_update()
    client = await session.scalar(stmt)
    if client is None:
        raise NotFound(f"client {client_id} not found")
    return client


async def _claim_app_clients(session: AsyncSession, client_id: str, app_client_ids: set[str]) -> None:
    """Map ``app_client_ids`` to the client; 409 naming those another client holds (the primary
    key of ``client_app_clients`` decides, also between concurrent requests)."""
    if not app_client_ids:
        return
    inserted = set(
        (
            await session.scalars(
                insert(ClientAppClient)
                .values([{"app_client_id": a, "client_id": client_id} for a in sorted(app_client_ids)])
                .on_conflict_do_nothing(index_elements=[ClientAppClient.app_client_id])
                .returning(ClientAppClient.app_client_id)
            )
        ).all()
    )
    taken = sorted(app_client_ids - inserted)
    if taken:
        owners = (
            await session.execute(
                select(ClientAppClient.app_client_id, ClientAppClient.client_id).where(
                    ClientAppClient.app_client_id.in_(taken)
                )
            )
        ).all()
        described = ", ".join(f"{row.app_client_id} (client {row.client_id})" for row in owners) or ", ".join(taken)
        raise Conflict(f"app client ids already belong to another client: {described}")


async def create_client(session: AsyncSession, body: ClientCreate) -> Client:
    stmt = (
        insert(Client)
        .values(client_id=body.client_id, name=body.name)
        .on_conflict_do_nothing(index_elements=[Client.client_id])
        .returning(Client.client_id)
    )
    if await session.scalar(stmt) is None:
        raise Conflict(f"client {body.client_id} already exists")
    await _claim_app_clients(session, body.client_id, set(body.app_client_ids))
    # a machine token whose claim is the new client id or one of its app clients has a tenant now
    forget_on_commit(session)
    return await get_client(session, body.client_id)


async def update_client(session: AsyncSession, client_id: str, body: ClientUpdate) -> Client:
    client = await get_client(session, client_id, for_update=True)
    changed = False
    if body.app_client_ids is not None:
        wanted = set(body.app_client_ids)
        current = set(client.app_client_ids)
        if wanted != current:
            if current - wanted:
                await session.execute(
                    delete(ClientAppClient).where(
                        ClientAppClient.client_id == client_id,
                        ClientAppClient.app_client_id.in_(sorted(current - wanted)),
                    )
                )
            await _claim_app_clients(session, client_id, wanted - current)
            forget_on_commit(session)
            changed = True
    if body.name is not None and body.name != client.name:
        client.name = body.name
        changed = True
    if body.status is not None and body.status != client.status:
        client.status = body.status
        changed = True
    if changed:
        client.updated_at = func.now()
        await session.flush()
        client = await get_client(session, client_id)  # the server-side updated_at, the app clients
    return client
