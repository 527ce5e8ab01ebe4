"""Clients (spec 4) and the keyset pagination every list route uses."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from datetime import datetime

import pytest
from fastapi import Response
from sqlalchemy import select

from pie.errors import BadRequest
from pie.pagination import NEXT_CURSOR_HEADER, PageParams, encode_cursor, paginate
from pie.tables.clients import Client


async def create(client, admin, client_id: str, name: str | None = None):
    r = await client.post(
        "/v2/clients", json={"client_id": client_id, "name": name or client_id.title()}, headers=admin
    )
    assert r.status_code == 201, r.text
    return r.json()


async def test_create_get_list(client, admin):
    r = await client.get("/v2/clients", headers=admin)
    assert r.status_code == 200 and r.json() == []
    body = await create(client, admin, "sealink", "SeaLink")
    assert body["client_id"] == "sealink" and body["name"] == "SeaLink" and body["status"] == "active"
    uuid.UUID(body["client_uuid"])
    for ts in ("created_at", "updated_at"):
        assert body[ts].endswith("Z")
        datetime.fromisoformat(body[ts].replace("Z", "+00:00"))
    assert set(body) == {"client_id", "client_uuid", "name", "status", "app_client_ids", "created_at", "updated_at"}
    assert body["app_client_ids"] == []
    r = await client.get("/v2/clients/sealink", headers=admin)
    assert r.status_code == 200 and r.json() == body
    r = await client.get("/v2/clients", headers=admin)
    assert r.json() == [body] and NEXT_CURSOR_HEADER.lower() not in r.headers


async def test_create_conflict_keeps_the_original(client, admin):
    first = await create(client, admin, "dup", "First")
    r = await client.post("/v2/clients", json={"client_id": "dup", "name": "Second"}, headers=admin)
    assert r.status_code == 409 and r.json()["success"] is False
    assert (await client.get("/v2/clients/dup", headers=admin)).json() == first


async def test_concurrent_creates_one_wins(client, admin, session):
    results = await asyncio.gather(
        *[client.post("/v2/clients", json={"client_id": "race", "name": f"n{i}"}, headers=admin) for i in range(8)]
    )
    assert sorted(r.status_code for r in results) == [201] + [409] * 7
    assert len((await session.scalars(select(Client).where(Client.client_id == "race"))).all()) == 1


async def test_client_names_are_trimmed_and_nonempty(client, admin):
    assert (await create(client, admin, "trim", "  Trimmed  "))["name"] == "Trimmed"
    r = await client.post("/v2/clients", json={"client_id": "empty", "name": ""}, headers=admin)
    assert r.status_code == 400


async def test_update_name_and_status(client, admin):
    before = await create(client, admin, "sealink", "SeaLink")
    r = await client.patch("/v2/clients/sealink", json={"name": "SeaLink Travel"}, headers=admin)
    assert r.status_code == 200, r.text
    after = r.json()
    assert after["name"] == "SeaLink Travel" and after["status"] == "active"
    assert after["client_uuid"] == before["client_uuid"] and after["created_at"] == before["created_at"]
    assert after["updated_at"] >= before["updated_at"]
    r = await client.patch("/v2/clients/sealink", json={"status": "suspended"}, headers=admin)
    assert r.status_code == 200 and r.json()["status"] == "suspended" and r.json()["name"] == "SeaLink Travel"
    # a suspended client can still be read, by its own tenant too
    r = await client.get("/v2/clients/sealink", headers=admin)
    assert r.json()["status"] == "suspended"
    r = await client.patch("/v2/clients/sealink", json={"status": "active"}, headers=admin)
    assert r.json()["status"] == "active"
    # an empty patch changes nothing
    r = await client.patch("/v2/clients/sealink", json={}, headers=admin)
    assert r.status_code == 200 and r.json()["name"] == "SeaLink Travel"


async def test_suspended_client_is_readable_but_not_writable(client, admin, auth, session):
    await create(client, admin, "sealink")
    await client.patch("/v2/clients/sealink", json={"status": "suspended"}, headers=admin)
    headers = auth(username="bob", groups=["client:sealink"])
    assert (await client.get("/v2/clients/sealink", headers=headers)).json()["status"] == "suspended"
    assert [c["client_id"] for c in (await client.get("/v2/clients", headers=headers)).json()] == ["sealink"]
    # tenant writes under a suspended client are 422, and work again once it is active
    r = await client.post("/v2/clients/sealink/domains", json={"domain_id": "d1"}, headers=headers)
    assert r.status_code == 422 and "suspended" in r.json()["message"]
    assert (await client.get("/v2/clients/sealink/domains", headers=headers)).json() == []
    await client.patch("/v2/clients/sealink", json={"status": "active"}, headers=admin)
    r = await client.post("/v2/clients/sealink/domains", json={"domain_id": "d1"}, headers=headers)
    assert r.status_code == 201, r.text


async def test_list_is_paginated_with_cursor(client, admin):
    ids = [f"c{i:02d}" for i in range(7)]
    for cid in reversed(ids):
        await create(client, admin, cid)
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        r = await client.get("/v2/clients", params=params, headers=admin)
        assert r.status_code == 200
        page = [c["client_id"] for c in r.json()]
        assert len(page) <= 3
        seen += page
        pages += 1
        cursor = r.headers.get(NEXT_CURSOR_HEADER)
        if not cursor:
            break
    assert seen == ids and pages == 3
    # exactly a page's worth: no dangling cursor
    r = await client.get("/v2/clients", params={"limit": 7}, headers=admin)
    assert len(r.json()) == 7 and NEXT_CURSOR_HEADER.lower() not in r.headers
    r = await client.get("/v2/clients", params={"limit": 6}, headers=admin)
    assert NEXT_CURSOR_HEADER.lower() in r.headers


async def test_list_pagination_respects_tenant_filter(client, admin, auth):
    for cid in ("a", "b", "c", "d"):
        await create(client, admin, cid)
    headers = auth(username="bob", groups=["client:b", "client:d", "client:zz"])
    r = await client.get("/v2/clients", params={"limit": 1}, headers=headers)
    assert [c["client_id"] for c in r.json()] == ["b"]
    r = await client.get("/v2/clients", params={"limit": 1, "cursor": r.headers[NEXT_CURSOR_HEADER]}, headers=headers)
    assert [c["client_id"] for c in r.json()] == ["d"] and NEXT_CURSOR_HEADER.lower() not in r.headers


# --- paginate() on uuid, timestamp and composite keys ----------------------------------------------


async def walk(session, keys, limit: int, descending: bool = False) -> list[Client]:
    out: list[Client] = []
    cursor = None
    while True:
        response = Response()
        rows = await paginate(
            session, select(Client), keys, PageParams(limit=limit, cursor=cursor), response, descending=descending
        )
        out += rows
        cursor = response.headers.get(NEXT_CURSOR_HEADER)
        if not cursor:
            return out


@pytest.fixture
async def five_clients(session):
    for i in range(5):
        session.add(Client(client_id=f"p{i}", name=f"P{i}"))
        await session.flush()  # distinct created_at order is not guaranteed; keys below are unique anyway
    await session.commit()


async def test_paginate_uuid_key(session, five_clients):
    rows = await walk(session, [Client.client_uuid], 2)
    assert [r.client_uuid for r in rows] == sorted(r.client_uuid for r in rows) and len(rows) == 5
    rows = await walk(session, [Client.client_uuid], 2, descending=True)
    assert [r.client_uuid for r in rows] == sorted((r.client_uuid for r in rows), reverse=True) and len(rows) == 5


async def test_paginate_timestamp_and_text_keys(session, five_clients):
    rows = await walk(session, [Client.created_at, Client.client_id], 2)
    assert len(rows) == 5 and len({r.client_id for r in rows}) == 5
    assert [(r.created_at, r.client_id) for r in rows] == sorted((r.created_at, r.client_id) for r in rows)
    rows = await walk(session, [Client.created_at, Client.client_id], 3, descending=True)
    assert [(r.created_at, r.client_id) for r in rows] == sorted(
        ((r.created_at, r.client_id) for r in rows), reverse=True
    )


@pytest.mark.parametrize(
    "keys_name,values",
    [
        ("uuid", ["not-a-uuid"]),
        ("uuid", [1]),
        ("ts", ["yesterday", "p1"]),
        ("ts", ["2024-01-01T00:00:00+00:00"]),  # wrong arity
        ("text", [["nested"]]),
        ("text", ["nul\x00byte"]),
        ("text", [None]),
    ],
)
async def test_paginate_rejects_bad_cursors(session, keys_name, values):
    keys = {"uuid": [Client.client_uuid], "ts": [Client.created_at, Client.client_id], "text": [Client.client_id]}[
        keys_name
    ]
    crafted = base64.urlsafe_b64encode(json.dumps(values).encode()).decode().rstrip("=")
    with pytest.raises(BadRequest, match="invalid cursor"):
        await paginate(session, select(Client), keys, PageParams(limit=2, cursor=crafted), Response())


async def test_bad_cursor_through_a_route_is_400(client, admin):
    r = await client.get("/v2/clients", params={"cursor": encode_cursor(["a", "b"])}, headers=admin)
    assert r.status_code == 400 and r.json() == {"success": False, "message": "invalid cursor"}
