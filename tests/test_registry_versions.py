"""Model versions (spec 7.2): create (explicit, allocated, concurrent), snapshot, frozen features,
list/get, the status transition table row by row, model activation."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import text

ECHO = {"type": "in_process", "value": "echo"}
LAMBDA = {"type": "lambda", "arn": "arn:aws:lambda:us-east-1:123456789012:function:infer"}
CONTRACTS = {"inference": {"input_schema": {"type": "object", "required": ["route"]}}}
FEATURES = [
    {
        "name": "route",
        "json_schema": {"type": "string", "enum": ["Adelaide to Sydney", "Sydney to Adelaide"]},
        "mandatory": True,
    },
    {"name": "competitor_count", "json_schema": {"type": "integer", "minimum": 0, "maximum": 20, "default": 3}},
]


async def make_model(client, admin, model_id="m1", **extra):
    body = {"id": model_id, "name": "M", "description": "", "handlers": {"training": ECHO, "inference": ECHO}} | extra
    r = await client.post("/v2/models", json=body, headers=admin)
    assert r.status_code == 201, r.text
    return r.json()


async def new_version(client, headers, model_id="m1", **body):
    return await client.post(f"/v2/models/{model_id}/new_version", json=body, headers=headers)


async def set_status(client, headers, status, model_id="m1", version="1"):
    return await client.post(
        f"/v2/models/{model_id}/versions/{version}/new_status", json={"status": status}, headers=headers
    )


# ---- create ----------------------------------------------------------------------------------


async def test_create_version_snapshots_handlers_and_contracts(client, admin):
    model = await make_model(client, admin, handler_contracts=CONTRACTS)
    r = await new_version(client, admin, description="first", metadata={"dataset": "2024-q1"})
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["model"]["id"] == "m1" and body["model"]["status"] == "pending"
    assert body["model"]["updated_at"] == model["updated_at"]
    v = body["version"]
    assert v["model_id"] == "m1" and v["version"] == "1" and v["status"] == "pending"
    assert v["description"] == "first" and v["metadata"] == {"dataset": "2024-q1"}
    assert v["handlers"] == {"training": ECHO, "inference": ECHO}
    assert v["handler_contracts"] == CONTRACTS
    assert v["features"] is None

    # once the model is active, a later model change does not touch the existing version's
    # snapshot (a pending model's versions take it in place: spec 15.3)
    r = await client.post("/v2/models/m1/versions/1/new_status", json={"status": "active"}, headers=admin)
    assert r.status_code == 200
    r = await client.put(
        "/v2/models/m1",
        json={"name": "M", "description": "", "handlers": {"training": ECHO, "inference": LAMBDA}},
        headers=admin,
    )
    assert r.status_code == 200
    r = await client.get("/v2/models/m1/versions/1", headers=admin)
    assert r.json()["handlers"]["inference"] == ECHO
    assert r.json()["handler_contracts"] == CONTRACTS


async def test_explicit_versions_and_allocation_skips_taken_integers(client, admin):
    await make_model(client, admin)
    assert (await new_version(client, admin, version="2.0.0")).json()["version"]["version"] == "2.0.0"
    assert (await new_version(client, admin, version="2")).status_code == 201
    assert (await new_version(client, admin, version="3")).status_code == 201
    allocated = [(await new_version(client, admin)).json()["version"]["version"] for _ in range(3)]
    assert allocated == ["1", "4", "5"]


async def test_existing_version_is_409(client, admin):
    await make_model(client, admin)
    assert (await new_version(client, admin, version="1")).status_code == 201
    r = await new_version(client, admin, version="1", description="again")
    assert r.status_code == 409
    assert r.json()["success"] is False
    r = await client.get("/v2/models/m1/versions/1", headers=admin)
    assert r.json()["description"] == ""


async def test_version_errors(client, admin, auth):
    r = await new_version(client, admin, model_id="nope")
    assert r.status_code == 404
    # 404 before a 422 about the frozen features
    r = await new_version(client, admin, model_id="nope", features=[{"name": "bad name", "json_schema": {}}])
    assert r.status_code == 404, r.text
    await make_model(client, admin)
    assert (await new_version(client, admin, version="has space")).status_code == 400
    assert (await new_version(client, admin, version=3)).status_code == 400
    assert (await new_version(client, admin, metadata="x")).status_code == 400
    assert (await new_version(client, admin, features={"name": "x"})).status_code == 400
    # a definition that is not an object is an invalid definition (422 naming it), as for a
    # domain's features
    r = await new_version(client, admin, features=["route"])
    assert r.status_code == 422 and "invalid feature definitions" in r.json()["message"], r.text
    assert (await new_version(client, auth(scopes=["read_models"]))).status_code == 403
    assert (await new_version(client, {})).status_code == 401
    r = await client.get("/v2/models/m1/versions", headers=admin)
    assert r.json() == []


async def test_frozen_features_are_validated_and_stored(client, admin):
    await make_model(client, admin)
    r = await new_version(client, admin, features=FEATURES)
    assert r.status_code == 201, r.text
    stored = r.json()["version"]["features"]
    assert [f["name"] for f in stored] == ["route", "competitor_count"]
    assert stored[1]["mandatory"] is False  # normalised

    bad = [
        [{"name": "route", "json_schema": {"type": "string"}}, {"name": "route", "json_schema": {"type": "string"}}],
        [{"name": "1bad", "json_schema": {"type": "string"}}],
        [{"name": "x", "json_schema": {"type": "strin"}}],
        [{"name": "x", "json_schema": {"type": "integer", "default": "three"}}],
    ]
    for features in bad:
        r = await new_version(client, admin, features=features)
        assert r.status_code == 422, (features, r.text)
        assert "invalid feature definitions" in r.json()["message"]
    r = await client.get("/v2/models/m1/versions", headers=admin)
    assert len(r.json()) == 1


async def test_concurrent_allocation_gives_distinct_consecutive_integers(client, admin):
    await make_model(client, admin)
    responses = await asyncio.gather(*(new_version(client, admin) for _ in range(20)))
    assert [r.status_code for r in responses] == [201] * 20
    versions = sorted(int(r.json()["version"]["version"]) for r in responses)
    assert versions == list(range(1, 21))


async def test_concurrent_explicit_and_allocated_versions_do_not_collide(client, admin):
    await make_model(client, admin)
    calls = [new_version(client, admin) for _ in range(6)] + [
        new_version(client, admin, version=str(n)) for n in (2, 4)
    ]
    responses = await asyncio.gather(*calls)
    allocated, explicit = responses[:6], responses[6:]
    # allocation never collides: it skips whatever an explicit request took first
    assert [r.status_code for r in allocated] == [201] * 6
    # an explicit request either got its number or found it already allocated
    assert all(r.status_code in (201, 409) for r in explicit)
    r = await client.get("/v2/models/m1/versions", headers=admin)
    stored = sorted(int(v["version"]) for v in r.json())
    assert stored == list(range(1, len(stored) + 1))
    assert len(stored) == 6 + sum(r.status_code == 201 for r in explicit)


# ---- list / get ------------------------------------------------------------------------------


async def test_list_and_get_versions(client, admin, auth):
    await make_model(client, admin)
    for _ in range(3):
        await new_version(client, admin)
    reader = auth(scopes=["read_models"])
    r = await client.get("/v2/models/m1/versions", params={"limit": 2}, headers=reader)
    assert r.status_code == 200
    assert [v["version"] for v in r.json()] == ["1", "2"]
    r = await client.get(
        "/v2/models/m1/versions", params={"limit": 2, "cursor": r.headers["x-next-cursor"]}, headers=reader
    )
    assert [v["version"] for v in r.json()] == ["3"] and "x-next-cursor" not in r.headers

    r = await client.get("/v2/models/m1/versions/2", headers=reader)
    assert r.status_code == 200 and r.json()["version"] == "2"
    assert (await client.get("/v2/models/m1/versions/9", headers=reader)).status_code == 404
    assert (await client.get("/v2/models/zz/versions/1", headers=reader)).status_code == 404
    assert (await client.get("/v2/models/zz/versions", headers=reader)).status_code == 404
    assert (await client.get("/v2/models/m1/versions/b@d", headers=reader)).status_code == 400
    assert (await client.get("/v2/models/m1/versions", headers=auth(scopes=["run_inference"]))).status_code == 403


# ---- status transitions ----------------------------------------------------------------------

STATUSES = ["pending", "training", "active", "failed"]
ALLOWED = {
    ("pending", "training"),
    ("pending", "active"),
    ("training", "active"),
    ("training", "failed"),
    ("failed", "training"),
}
# how to reach each starting status from pending
PATHS = {"pending": [], "training": ["training"], "active": ["active"], "failed": ["training", "failed"]}


@pytest.mark.parametrize("start", STATUSES)
@pytest.mark.parametrize("target", STATUSES)
async def test_transition_table(client, admin, session, start, target):
    await make_model(client, admin)
    await new_version(client, admin)
    for step in PATHS[start]:
        assert (await set_status(client, admin, step)).status_code == 200
    before = await session.scalar(text("SELECT updated_at FROM model_versions WHERE version = '1'"))

    r = await set_status(client, admin, target)
    if start == target:
        assert r.status_code == 200, r.text
        assert r.json()["version"]["status"] == start
        assert r.json()["triggered_events"] == []
        after = await session.scalar(text("SELECT updated_at FROM model_versions WHERE version = '1'"))
        assert after == before  # a true no-op
    elif (start, target) in ALLOWED:
        assert r.status_code == 200, r.text
        assert r.json()["version"]["status"] == target
        assert r.json()["triggered_events"] == []
    else:
        assert r.status_code == 422, r.text
        assert r.json()["success"] is False
        assert f"{start} -> {target}" in r.json()["message"]
    stored = await session.scalar(text("SELECT status FROM model_versions WHERE version = '1'"))
    expected = target if (start, target) in ALLOWED else start
    assert stored == expected


async def test_model_becomes_active_with_its_first_active_version(client, admin):
    await make_model(client, admin)
    await new_version(client, admin)
    await new_version(client, admin)
    r = await set_status(client, admin, "training")
    assert r.json()["model"]["status"] == "pending"
    r = await set_status(client, admin, "failed")
    assert r.json()["model"]["status"] == "pending"
    r = await set_status(client, admin, "active", version="2")
    assert r.status_code == 200
    assert r.json()["model"]["status"] == "active"
    assert r.json()["version"]["status"] == "active"
    r = await client.get("/v2/models/m1", headers=admin)
    assert r.json()["status"] == "active"


async def test_set_status_errors(client, admin, auth):
    assert (await set_status(client, admin, "active", model_id="zz")).status_code == 404
    await make_model(client, admin)
    assert (await set_status(client, admin, "active", version="7")).status_code == 404
    await new_version(client, admin)
    assert (await set_status(client, admin, "deleted")).status_code == 400
    r = await client.post("/v2/models/m1/versions/1/new_status", json={}, headers=admin)
    assert r.status_code == 400
    assert (await set_status(client, auth(scopes=["read_models"]), "active")).status_code == 403
    assert (await set_status(client, {}, "active")).status_code == 401
    r = await client.get("/v2/models/m1/versions/1", headers=admin)
    assert r.json()["status"] == "pending"


async def test_concurrent_activation_fires_once(client, admin, session):
    """Racing `training -> active` requests serialize on the version row: one transition fires
    the subscriptions, the others see the version already active (no-op)."""
    await make_model(client, admin)
    await new_version(client, admin)
    r = await client.post(
        "/v2/models/m1/event-subscriptions",
        json={
            "trigger_event": "training_complete",
            "target_model_id": "m1",
            "target_action": "inference",
            "input_source": "stored",
            "input": {},
        },
        headers=admin,
    )
    assert r.status_code == 201
    assert (await set_status(client, admin, "training")).status_code == 200
    responses = await asyncio.gather(*(set_status(client, admin, "active") for _ in range(8)))
    assert [r.status_code for r in responses] == [200] * 8
    fired = [r.json()["triggered_events"] for r in responses if r.json()["triggered_events"]]
    assert len(fired) == 1 and len(fired[0]) == 1
    assert await session.scalar(text("SELECT count(*) FROM jobs")) == 1
