"""Registry tenants: plain functions over a session; they flush, never commit."""

from __future__ import annotations

from fastapi import Response
from sqlalchemy import delete, func, select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import selectinload

from pie.auth import Principal
from pie.auth.app_clients import forget_on_commit
from pie.clients.schemas import ClientCreate, ClientUpdate
from pie.errors import Conflict, NotFound
from pie.pagination import PageParams, paginate
from pie.tables.clients import Client, ClientAppClient


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


# One namespace for client ids and app-client ids (spec 15.5): a machine token's ``client_id``
# claim names its tenant through ``app_client_ids`` or, for development tokens, directly; an
# identifier that were both one client's app client and another client's id would let one
# tenant's machine tokens act for the other. Every change that adds or frees an identifier first
# takes a transaction-level advisory lock per identifier (in one statement, in hash order, so two
# changes never wait for each other crosswise), then checks the other table: concurrent changes
# naming one identifier are serialized and the second one sees the first.
_LOCK_IDS = text(
    """
    SELECT count(pg_advisory_xact_lock(h)) FROM (
        SELECT DISTINCT hashtextextended('pie.client-namespace:' || id, 0) AS h
        FROM unnest(CAST(:ids AS text[])) AS id ORDER BY h
    ) AS ordered
    """
)


async def _lock_identifiers(session: AsyncSession, ids: set[str]) -> None:
    if ids:
        await session.execute(_LOCK_IDS, {"ids": sorted(ids)})


async def _refuse_client_ids_as_app_clients(session: AsyncSession, client_id: str, app_client_ids: set[str]) -> None:
    """409 when one of ``app_client_ids`` is a client's id (also ``client_id``'s own)."""
    if not app_client_ids:
        return
    named = set(
        (await session.scalars(select(Client.client_id).where(Client.client_id.in_(sorted(app_client_ids))))).all()
    )
    if client_id in app_client_ids:
        named.add(client_id)
    if named:
        described = ", ".join(f"{n} (this client)" if n == client_id else f"{n} (a client)" for n in sorted(named))
        raise Conflict(f"app client ids may not be client ids: {described}")


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
    app_client_ids = set(body.app_client_ids)
    await _lock_identifiers(session, {body.client_id} | app_client_ids)
    owner = await session.scalar(
        select(ClientAppClient.client_id).where(ClientAppClient.app_client_id == body.client_id)
    )
    if owner is not None:
        raise Conflict(f"client id {body.client_id} is already an app client id of client {owner}")
    await _refuse_client_ids_as_app_clients(session, body.client_id, app_client_ids)
    stmt = (
        insert(Client)
        .values(client_id=body.client_id, name=body.name)
        .on_conflict_do_nothing(index_elements=[Client.client_id])
        .returning(Client.client_id)
    )
    if await session.scalar(stmt) is None:
        raise Conflict(f"client {body.client_id} already exists")
    await _claim_app_clients(session, body.client_id, app_client_ids)
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
            await _lock_identifiers(session, wanted ^ current)
            await _refuse_client_ids_as_app_clients(session, client_id, wanted - current)
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
