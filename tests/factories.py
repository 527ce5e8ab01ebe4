"""Shared test factories: rows arranged directly through the ORM (clients, models, versions)
and small HTTP helpers for the tenant side. Import freely from any test module."""

from __future__ import annotations

import asyncio
import copy
import inspect
import time
from collections.abc import Awaitable
from typing import Any

import httpx
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from pie.tables.clients import Client
from pie.tables.jobs import Job
from pie.tables.registry import Model, ModelVersion
from pie.tables.tenancy import Service

# the spec's example feature set (5.2): seven definitions, only `route` mandatory
SEVEN_FEATURES: list[dict[str, Any]] = [
    {
        "name": "route",
        "json_schema": {"type": "string", "enum": ["Adelaide to Sydney", "Sydney to Adelaide"]},
        "mandatory": True,
    },
    {"name": "competitor_count", "json_schema": {"type": "integer", "minimum": 0, "maximum": 20}, "mandatory": False},
    {"name": "advertising_spend", "json_schema": {"type": "number", "minimum": 0, "maximum": 100}, "mandatory": False},
    {"name": "on_demand", "json_schema": {"type": "boolean"}, "mandatory": False},
    {
        "name": "weekly_demand",
        "json_schema": {"type": "array", "items": {"type": "number", "minimum": 0}, "minItems": 7, "maxItems": 7},
        "mandatory": False,
    },
    {
        "name": "origin_destination_pair",
        "json_schema": {
            "type": "array",
            "prefixItems": [{"type": "string"}, {"type": "string"}],
            "items": False,
            "minItems": 2,
            "maxItems": 2,
        },
        "mandatory": False,
    },
    {
        "name": "market_ref",
        "json_schema": {"oneOf": [{"type": "string", "enum": ["spot", "auction"]}, {"type": "integer", "minimum": 0}]},
        "mandatory": False,
    },
]

IN_PROCESS_HANDLERS = {
    "training": {"type": "in_process", "value": "echo"},
    "inference": {"type": "in_process", "value": "reference_pricing"},
}


def seven_features() -> list[dict[str, Any]]:
    return copy.deepcopy(SEVEN_FEATURES)


def feature(name: str, schema: dict[str, Any], mandatory: bool = False) -> dict[str, Any]:
    return {"name": name, "json_schema": schema, "mandatory": mandatory}


async def make_client(session: AsyncSession, client_id: str = "client-1", *, status: str = "active") -> Client:
    client = Client(client_id=client_id, name=client_id.title(), status=status)
    session.add(client)
    await session.commit()
    return client


async def make_model(
    session: AsyncSession,
    model_id: str = "pricing-model",
    *,
    handlers: dict[str, Any] | None = None,
    handler_contracts: dict[str, Any] | None = None,
    status: str = "active",
) -> Model:
    model = Model(
        id=model_id,
        name=model_id,
        handlers=handlers or IN_PROCESS_HANDLERS,
        handler_contracts=handler_contracts,
        status=status,
    )
    session.add(model)
    await session.commit()
    return model


async def make_version(
    session: AsyncSession,
    model_id: str = "pricing-model",
    version: str = "1",
    *,
    status: str = "active",
    features: list[Any] | None = None,
    handler_contracts: dict[str, Any] | None = None,
    handlers: dict[str, Any] | None = None,
) -> ModelVersion:
    """A model version (the model is created first if missing). ``features`` is the frozen schema."""
    if await session.get(Model, model_id) is None:
        await make_model(session, model_id, handlers=handlers, handler_contracts=handler_contracts)
    row = ModelVersion(
        model_id=model_id,
        version=version,
        status=status,
        handlers=handlers or IN_PROCESS_HANDLERS,
        handler_contracts=handler_contracts,
    )
    if features is not None:
        row.features = features
    session.add(row)
    await session.commit()
    return row


def domain_url(client_id: str, domain_id: str) -> str:
    return f"/v2/clients/{client_id}/domains/{domain_id}"


async def create_domain(
    http: httpx.AsyncClient,
    headers: dict[str, str],
    client_id: str = "client-1",
    domain_id: str = "south_australia",
    features: list[Any] | None = None,
) -> dict[str, Any]:
    r = await http.post(
        f"/v2/clients/{client_id}/domains",
        json={
            "domain_id": domain_id,
            "name": domain_id,
            "features": seven_features() if features is None else features,
        },
        headers=headers,
    )
    assert r.status_code == 201, r.text
    return r.json()


async def assign(
    http: httpx.AsyncClient,
    headers: dict[str, str],
    client_id: str = "client-1",
    domain_id: str = "south_australia",
    key: str = "default",
    model_id: str = "pricing-model",
    model_version: str = "1",
    *,
    service_id: str | None = None,
    expect: int = 200,
    **extra: Any,
) -> httpx.Response:
    base = domain_url(client_id, domain_id) + (f"/service/{service_id}" if service_id else "")
    r = await http.put(
        f"{base}/assignments/{key}",
        json={"model_id": model_id, "model_version": model_version, **extra},
        headers=headers,
    )
    assert r.status_code == expect, r.text
    return r


async def init_service(
    http: httpx.AsyncClient,
    headers: dict[str, str],
    service_id: str,
    static_features: dict[str, Any] | None = None,
    client_id: str = "client-1",
    domain_id: str = "south_australia",
    *,
    expect: int = 202,
    **extra: Any,
) -> httpx.Response:
    r = await http.post(
        domain_url(client_id, domain_id) + "/service/init",
        json={"service_id": service_id, "static_features": static_features or {}, **extra},
        headers=headers,
    )
    assert r.status_code == expect, r.text
    return r


async def tenant_setup(
    http: httpx.AsyncClient,
    session: AsyncSession,
    headers: dict[str, str],
    *,
    client_id: str = "client-1",
    domain_id: str = "south_australia",
    features: list[Any] | None = None,
    version_features: list[Any] | None = None,
    handler_contracts: dict[str, Any] | None = None,
) -> None:
    """Client, model ``pricing-model`` version ``1`` (active), a domain with the seven example
    features (or ``features``) and an active ``default`` domain assignment to version 1."""
    await make_client(session, client_id)
    await make_version(session, features=version_features, handler_contracts=handler_contracts)
    await create_domain(http, headers, client_id, domain_id, features)
    await assign(http, headers, client_id, domain_id)


async def fresh(session: AsyncSession, stmt: Any) -> list[Any]:
    """Rows of ``stmt`` re-read from the database (not the identity map's copies)."""
    return list((await session.scalars(stmt.execution_options(populate_existing=True))).all())


async def stored_service(
    session: AsyncSession, service_id: str, client_id: str = "client-1", domain_id: str = "south_australia"
) -> Service | None:
    return await session.scalar(
        select(Service)
        .where(Service.client_id == client_id, Service.domain_id == domain_id, Service.service_id == service_id)
        .execution_options(populate_existing=True)
    )


async def stored_job(session: AsyncSession, job_id: str) -> Job | None:
    return await session.get(Job, job_id, populate_existing=True)


async def jobs_of(session: AsyncSession, **filters: Any) -> list[Job]:
    stmt = select(Job).order_by(Job.job_id).execution_options(populate_existing=True)
    for name, value in filters.items():
        stmt = stmt.where(getattr(Job, name) == value)
    return list((await session.scalars(stmt)).all())


async def racing_uncommitted(
    engine: AsyncEngine, change_sql: str, params: dict[str, Any], request: Awaitable[httpx.Response]
) -> httpx.Response:
    """Run ``request`` while another transaction holds an uncommitted ``change_sql`` (e.g. a
    version turning failed, a client being suspended); commit the change once the request has
    either finished or is waiting for a lock, and return the request's response. A request that
    holds the right row lock waits and then sees the change; one that does not, finishes first."""
    async with engine.connect() as other:
        await other.begin()
        await other.execute(text(change_sql), params)
        task = asyncio.ensure_future(request)
        while not task.done():
            # pg_stat_activity is a snapshot cached for the transaction: clear it each time
            await other.execute(text("SELECT pg_stat_clear_snapshot()"))
            waiting = await other.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
                )
            )
            if waiting:
                break
            await asyncio.sleep(0.01)
        await other.commit()
    return await task


async def until(condition: Any, timeout: float = 30.0, what: str = "the condition") -> Any:
    """Wait for an event: poll ``condition`` (a function, sync or async) until it returns
    something true, and return that. The timeout is generous (a loaded machine is slow, not
    wrong): it only ends a test whose event never comes."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout} s"
        await asyncio.sleep(0.01)
