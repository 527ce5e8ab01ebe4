"""Bounded JSON bodies (issue 8, item 1): nesting beyond PIE_JSON_MAX_DEPTH (64) or containers
beyond PIE_JSON_MAX_ITEMS are a 400 naming the limit, on every route, before anything is stored;
the deepest accepted value in every stored JSON field reads back through every get and list
route; rows stored deeper before the limit existed never break a get or a list."""

from __future__ import annotations

import json
from typing import Any

import pytest
from factories import make_client
from sqlalchemy import text

from pie.jobs.logic import create_job

MAX_DEPTH = 64
ECHO = {"type": "in_process", "value": "echo"}
HANDLERS = {"training": ECHO, "inference": ECHO}
D = "/v2/clients/client-1/domains/dom"


def deep(levels: int) -> Any:
    """A JSON value ``levels`` containers deep (objects and arrays alternating), leaf a string."""
    value: Any = "leaf"
    for i in range(levels):
        value = {"k": value} if i % 2 else [value]
    return value


def depth(value: Any) -> int:
    d = 0
    while isinstance(value, (dict, list)) and value:
        value = next(iter(value.values())) if isinstance(value, dict) else value[0]
        d += 1
    return d


async def post_raw(client, url: str, raw: str, headers: dict[str, str]):
    return await client.post(url, content=raw.encode(), headers={**headers, "content-type": "application/json"})


async def count(session, table: str) -> int:
    return (await session.execute(text(f"SELECT count(*) FROM {table}"))).scalar_one()


@pytest.fixture
async def model(client, admin):
    r = await client.post(
        "/v2/models", json={"id": "m", "name": "m", "description": "", "handlers": HANDLERS}, headers=admin
    )
    assert r.status_code == 201, r.text
    r = await client.post("/v2/models/m/new_version", json={"version": "1"}, headers=admin)
    assert r.status_code == 201, r.text


@pytest.mark.parametrize("levels", [MAX_DEPTH, 300, 900, 50_000])
async def test_too_deep_bodies_are_400_naming_the_limit_and_store_nothing(client, admin, session, model, levels):
    # the body object is level 1: an input `levels` deep makes the body levels + 1 deep
    value = json.dumps(deep(levels)) if levels < 900 else "[" * levels + "]" * levels
    posts = {
        "/v2/models/m/versions/1/inference": f'{{"input": {{"a": {value}}}}}',
        "/v2/models": f'{{"id": "m2", "name": "m", "description": "", "handlers": {json.dumps(HANDLERS)}, "metadata": {{"a": {value}}}}}',
        "/v2/models/m/new_version": f'{{"version": "2", "metadata": {{"a": {value}}}}}',
    }
    for url, raw in posts.items():
        r = await post_raw(client, url, raw, admin)
        assert r.status_code == 400, (url, r.text)
        assert "nested deeper than 64 levels" in r.json()["message"] and "PIE_JSON_MAX_DEPTH" in r.json()["message"]
    assert await count(session, "jobs") == 0
    assert await count(session, "models") == 1 and await count(session, "model_versions") == 1


async def test_oversized_containers_are_400_naming_the_limit(client, admin, model):
    r = await client.post("/v2/models/m/versions/1/inference", json={"input": {"xs": [0] * 100_001}}, headers=admin)
    assert r.status_code == 400
    assert "more than 100000 items" in r.json()["message"] and "PIE_JSON_MAX_ITEMS" in r.json()["message"]
    wide = {f"k{i}": i for i in range(100_001)}
    r = await client.post("/v2/models/m/versions/1/inference", json={"input": wide}, headers=admin)
    assert r.status_code == 400 and "PIE_JSON_MAX_ITEMS" in r.json()["message"]
    # at the limit: accepted
    r = await client.post("/v2/models/m/versions/1/inference", json={"input": {"xs": [0] * 100_000}}, headers=admin)
    assert r.status_code == 202, r.text


async def test_a_too_deep_body_without_a_token_is_401(client, model):
    r = await post_raw(client, "/v2/models/m/versions/1/inference", '{"input": ' + "[" * 500 + "]" * 500 + "}", {})
    assert r.status_code == 401


async def test_the_deepest_accepted_value_reads_back_through_every_route(client, admin, session, model):
    """Every stored JSON field holds a value as deep as a body may carry it; every get and list
    route answers it unchanged."""
    await make_client(session, "client-1")
    v = deep(MAX_DEPTH - 2)  # body object (1) + the field's object (1) + v
    assert depth({"f": {"a": v}}) == MAX_DEPTH
    h = admin

    async def ok(method: str, url: str, expect: int, **kw: Any) -> Any:
        r = await client.request(method, url, headers=h, **kw)
        assert r.status_code == expect, (method, url, r.text)
        return r.json()

    # a body one level deeper is refused (the limit is exact)
    r = await client.post("/v2/models/m/versions/1/inference", json={"input": {"a": [v]}}, headers=h)
    assert r.status_code == 400, r.text

    await ok(
        "POST",
        "/v2/models",
        201,
        json={"id": "deep", "name": "d", "description": "", "handlers": HANDLERS, "metadata": {"a": v}},
    )
    await ok("POST", "/v2/models/deep/new_version", 201, json={"version": "1", "metadata": {"a": v}})
    await ok("POST", "/v2/models/deep/versions/1/new_status", 200, json={"status": "active"})
    features = [
        {"name": "blob", "json_schema": {}, "mandatory": False},
        {"name": "note", "json_schema": {"default": {"a": deep(MAX_DEPTH - 6)}}, "mandatory": False},
    ]
    await ok("POST", "/v2/clients/client-1/domains", 201, json={"domain_id": "dom", "features": features})
    await ok(
        "PUT",
        f"{D}/assignments/default",
        200,
        json={"model_id": "deep", "model_version": "1", "settings": {"a": v}, "metadata": {"a": v}},
    )
    await ok("POST", f"{D}/service/init", 202, json={"service_id": "s1", "static_features": {"blob": v}})
    direct = await ok("POST", "/v2/models/deep/versions/1/inference", 202, json={"input": {"a": v}})
    assigned = await ok("POST", f"{D}/assignments/default/jobs", 202, json={"input": {"a": v}})
    sub = await ok(
        "POST",
        "/v2/models/deep/event-subscriptions",
        201,
        json={
            "trigger_event": "training_complete",
            "target_model_id": "deep",
            "target_action": "inference",
            "input_source": "stored",
            "input": {"a": v},
        },
    )
    done = await create_job(session, job_type="inference", model_id="deep", model_version="1")
    await session.commit()
    await ok(
        "POST",
        f"/v2/models/deep/versions/1/jobs/{done.job_id}/complete",
        200,
        json={"status": "success", "output": {"a": v}},
    )

    model_out = await ok("GET", "/v2/models/deep", 200)
    assert model_out["metadata"] == {"a": v}
    assert [m for m in await ok("GET", "/v2/models", 200) if m["id"] == "deep"][0]["metadata"] == {"a": v}
    assert (await ok("GET", "/v2/models/deep/versions/1", 200))["metadata"] == {"a": v}
    assert (await ok("GET", "/v2/models/deep/versions", 200))[0]["metadata"] == {"a": v}
    dom = await ok("GET", D, 200)
    assert dom["features"] == features
    assert (await ok("GET", "/v2/clients/client-1/domains", 200))[0]["features"] == features
    assert await ok("GET", f"{D}/features", 200) == features
    a = await ok("GET", f"{D}/assignments/default", 200)
    assert a["settings"] == {"a": v} and a["metadata"] == {"a": v}
    assert (await ok("GET", f"{D}/assignments", 200))[0]["metadata"] == {"a": v}
    assert (await ok("GET", f"{D}/assignments/default/revisions", 200))[0]["settings"] == {"a": v}
    assert (await ok("GET", f"{D}/service/s1", 200))["provided_features"]["blob"] == v
    assert (await ok("GET", f"{D}/services", 200))[0]["provided_features"]["blob"] == v
    for job_id in (direct["inference_job_id"], assigned["job_id"]):
        assert (await ok("GET", f"/v2/jobs/{job_id}", 200))["input"] == {"a": v}
    assert (await ok("GET", f"/v2/jobs/{done.job_id}", 200))["output"] == {"a": v}
    listed = {j["job_id"]: j for j in await ok("GET", "/v2/jobs?limit=100", 200)}
    assert listed[direct["inference_job_id"]]["input"] == {"a": v}
    assert listed[done.job_id]["output"] == {"a": v}
    assert (await ok("GET", f"/v2/models/deep/event-subscriptions/{sub['id']}", 200))["input"] == {"a": v}
    assert (await ok("GET", "/v2/models/deep/event-subscriptions", 200))[0]["input"] == {"a": v}


async def test_rows_stored_deeper_before_the_limit_still_read_and_list(client, admin, session, model):
    """Values the API accepted before the limit (up to ~990 levels; pydantic's serializer stops
    at ~255) answer 200 - the part below 64 levels rendered as JSON text - and never break a list."""
    poisoned = await create_job(session, job_type="inference", model_id="m", model_version="1", input={"x": 1})
    healthy = await create_job(session, job_type="inference", model_id="m", model_version="1", input={"x": 2})
    await session.commit()
    very_deep = json.dumps(deep(900))
    await session.execute(
        text("UPDATE jobs SET input = CAST(:v AS jsonb), output = CAST(:v AS jsonb) WHERE job_id = :id"),
        {"v": very_deep, "id": poisoned.job_id},
    )
    await session.execute(
        text("UPDATE models SET metadata = CAST(:v AS jsonb) WHERE id = 'm'"), {"v": json.dumps({"a": deep(400)})}
    )
    await session.commit()

    r = await client.get(f"/v2/jobs/{poisoned.job_id}", headers=admin)
    assert r.status_code == 200, r.text
    rendered = r.json()["input"]
    # the shallow part is intact; the rest is the stored JSON, as text
    inner = rendered
    for _ in range(64):
        inner = inner["k"] if isinstance(inner, dict) else inner[0]
    assert isinstance(inner, str) and json.loads(inner) == deep(900 - 64)
    # deeper than Python's own parser goes (written by hand with SQL): still loads and renders
    abyss = await create_job(session, job_type="inference", model_id="m", model_version="1", input={"x": 3})
    await session.commit()
    await session.execute(
        text("UPDATE jobs SET input = CAST(:v AS jsonb) WHERE job_id = :id"),
        {"v": '{"a": ' + "[" * 5000 + "1" + "]" * 5000 + "}", "id": abyss.job_id},
    )
    await session.commit()
    r = await client.get(f"/v2/jobs/{abyss.job_id}", headers=admin)
    assert r.status_code == 200, r.text
    inner, levels = r.json()["input"]["a"], 0
    while isinstance(inner, list):
        inner, levels = inner[0], levels + 1
    # 64 levels as JSON (the input object and 63 arrays), the rest as its JSON text
    assert levels == 63 and inner == "[" * (5000 - 63) + "1" + "]" * (5000 - 63)
    r = await client.get("/v2/jobs", headers=admin)
    assert r.status_code == 200, r.text
    assert {j["job_id"] for j in r.json()} == {poisoned.job_id, healthy.job_id, abyss.job_id}
    assert next(j for j in r.json() if j["job_id"] == healthy.job_id)["input"] == {"x": 2}
    for url in ("/v2/models/m", "/v2/models"):
        r = await client.get(url, headers=admin)
        assert r.status_code == 200, (url, r.text)
