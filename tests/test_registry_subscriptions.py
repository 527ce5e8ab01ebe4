"""Event subscriptions (spec 8): create/list/get/update/delete, validation, warnings,
permissions and tenant visibility of replay subscriptions."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import text

ECHO = {"type": "in_process", "value": "echo"}
ROUTE_SCHEMA = {"type": "object", "properties": {"route": {"type": "string"}}, "required": ["route"]}


async def make_model(client, admin, model_id, contracts=None):
    body = {"id": model_id, "name": model_id, "description": "", "handlers": {"training": ECHO, "inference": ECHO}}
    if contracts is not None:
        body["handler_contracts"] = contracts
    r = await client.post("/v2/models", json=body, headers=admin)
    assert r.status_code == 201, r.text


def sub_body(**overrides):
    body = {
        "trigger_event": "training_complete",
        "target_model_id": "target",
        "target_action": "inference",
        "input_source": "stored",
        "input": {"route": "Adelaide to Sydney"},
        "label": "nightly replay",
    }
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not ...}


@pytest.fixture
async def models(client, admin):
    await make_model(client, admin, "source")
    await make_model(client, admin, "target", contracts={"inference": {"input_schema": ROUTE_SCHEMA}})


async def create_sub(client, admin, **overrides):
    r = await client.post("/v2/models/source/event-subscriptions", json=sub_body(**overrides), headers=admin)
    assert r.status_code == 201, r.text
    return r.json()


async def test_create_get_list(client, admin, models):
    sub = await create_sub(client, admin)
    assert uuid.UUID(sub["id"])
    assert sub["source_model_id"] == "source" and sub["target_model_id"] == "target"
    assert sub["trigger_event"] == "training_complete" and sub["target_action"] == "inference"
    assert sub["input_source"] == "stored" and sub["input"] == {"route": "Adelaide to Sydney"}
    assert sub["label"] == "nightly replay" and sub["status"] == "active"
    assert sub["warnings"] == []
    assert sub["created_at"].endswith("Z")

    second = await create_sub(
        client, admin, trigger_event="inference_complete", input_source="trigger_output", input=..., label=...
    )
    assert second["input"] is None and second["label"] is None

    r = await client.get(f"/v2/models/source/event-subscriptions/{sub['id']}", headers=admin)
    assert r.status_code == 200 and r.json() == sub
    r = await client.get("/v2/models/source/event-subscriptions", headers=admin)
    assert r.status_code == 200
    assert [s["id"] for s in r.json()] == [sub["id"], second["id"]]  # creation order
    r = await client.get("/v2/models/source/event-subscriptions", params={"limit": 1}, headers=admin)
    assert [s["id"] for s in r.json()] == [sub["id"]]
    r = await client.get(
        "/v2/models/source/event-subscriptions",
        params={"limit": 1, "cursor": r.headers["x-next-cursor"]},
        headers=admin,
    )
    assert [s["id"] for s in r.json()] == [second["id"]]

    # listed under its source only
    r = await client.get("/v2/models/target/event-subscriptions", headers=admin)
    assert r.json() == []
    r = await client.get(f"/v2/models/target/event-subscriptions/{sub['id']}", headers=admin)
    assert r.status_code == 404


async def test_stored_input_failing_target_schema_is_a_warning(client, admin, models):
    sub = await create_sub(client, admin, input={"route": 42})
    assert len(sub["warnings"]) == 1
    assert "input_schema" in sub["warnings"][0] and "target" in sub["warnings"][0]
    # the schema of the target action only: training has no contract
    sub = await create_sub(client, admin, target_action="training", input={"route": 42})
    assert sub["warnings"] == []


@pytest.mark.parametrize(
    "overrides, status",
    [
        ({"target_model_id": "missing"}, 422),
        ({"input": ...}, 422),  # stored without input
        ({"input": None}, 422),
        ({"input_source": "trigger_output"}, 422),  # input given but unused
        ({"trigger_event": "deployed"}, 400),
        ({"target_action": "evaluate"}, 400),
        ({"input_source": "somewhere"}, 400),
        ({"input": [1, 2]}, 400),
        ({"status": "stale"}, 400),
        ({"target_model_id": "bad id"}, 400),
        ({"label": 5}, 400),
    ],
)
async def test_create_errors(client, admin, models, session, overrides, status):
    r = await client.post("/v2/models/source/event-subscriptions", json=sub_body(**overrides), headers=admin)
    assert r.status_code == status, r.text
    assert r.json()["success"] is False
    assert await session.scalar(text("SELECT count(*) FROM event_subscriptions")) == 0


async def test_unknown_source_and_subscription_are_404(client, admin, models):
    r = await client.post("/v2/models/missing/event-subscriptions", json=sub_body(), headers=admin)
    assert r.status_code == 404
    assert (await client.get("/v2/models/missing/event-subscriptions", headers=admin)).status_code == 404
    unknown = uuid.uuid4()
    for method in ("GET", "PUT", "DELETE"):
        r = await client.request(
            method,
            f"/v2/models/source/event-subscriptions/{unknown}",
            json={} if method == "PUT" else None,
            headers=admin,
        )
        assert r.status_code == 404, method
    r = await client.get("/v2/models/source/event-subscriptions/not-a-uuid", headers=admin)
    assert r.status_code == 400


async def test_update_fields_and_warnings(client, admin, models):
    sub = await create_sub(client, admin)
    url = f"/v2/models/source/event-subscriptions/{sub['id']}"

    r = await client.put(url, json={"label": "renamed"}, headers=admin)
    assert r.status_code == 200
    assert r.json()["label"] == "renamed" and r.json()["input"] == sub["input"] and r.json()["status"] == "active"

    r = await client.put(url, json={"input": {"route": 7}}, headers=admin)
    assert r.json()["input"] == {"route": 7} and len(r.json()["warnings"]) == 1
    r = await client.put(url, json={"input": {"route": "Sydney to Adelaide"}, "status": "paused"}, headers=admin)
    assert r.json()["warnings"] == [] and r.json()["status"] == "paused"
    r = await client.put(url, json={"label": None}, headers=admin)
    assert r.json()["label"] is None and r.json()["status"] == "paused"
    r = await client.put(url, json={}, headers=admin)
    assert r.status_code == 200 and r.json()["input"] == {"route": "Sydney to Adelaide"}

    assert (await client.put(url, json={"input": None}, headers=admin)).status_code == 422
    assert (await client.put(url, json={"status": "stale"}, headers=admin)).status_code == 400
    # null is a wrong type for status: 400, as on create
    assert (await client.put(url, json={"status": None}, headers=admin)).status_code == 400
    r = await client.post("/v2/models/source/event-subscriptions", json=sub_body(status=None), headers=admin)
    assert r.status_code == 400
    assert (await client.put(url, json={"input": "x"}, headers=admin)).status_code == 400
    r = await client.get(url, headers=admin)
    assert r.json()["status"] == "paused" and r.json()["input"] == {"route": "Sydney to Adelaide"}


async def test_trigger_output_subscription_takes_no_input(client, admin, models):
    sub = await create_sub(client, admin, input_source="trigger_output", input=...)
    url = f"/v2/models/source/event-subscriptions/{sub['id']}"
    assert (await client.put(url, json={"input": {"a": 1}}, headers=admin)).status_code == 422
    assert (await client.put(url, json={"input": None, "label": "ok"}, headers=admin)).status_code == 200


async def test_stale_subscription_can_be_reactivated_and_warnings_follow_the_new_contract(client, admin, models):
    sub = await create_sub(client, admin, input={"route": "Adelaide to Sydney"})
    # the target's inference contract changes: the subscription goes stale
    r = await client.put(
        "/v2/models/target",
        json={
            "name": "target",
            "description": "",
            "handlers": {"training": ECHO, "inference": ECHO},
            "handler_contracts": {"inference": {"input_schema": {"type": "object", "required": ["day_of_week"]}}},
        },
        headers=admin,
    )
    assert r.status_code == 200
    url = f"/v2/models/source/event-subscriptions/{sub['id']}"
    assert (await client.get(url, headers=admin)).json()["status"] == "stale"
    r = await client.put(url, json={"status": "active"}, headers=admin)
    assert r.status_code == 200
    assert r.json()["status"] == "active"
    assert len(r.json()["warnings"]) == 1 and "day_of_week" in r.json()["warnings"][0]


async def test_delete(client, admin, models, session):
    sub = await create_sub(client, admin)
    url = f"/v2/models/source/event-subscriptions/{sub['id']}"
    r = await client.delete(url, headers=admin)
    assert r.status_code == 204 and r.content == b""
    assert (await client.get(url, headers=admin)).status_code == 404
    assert (await client.delete(url, headers=admin)).status_code == 404
    assert await session.scalar(text("SELECT count(*) FROM event_subscriptions")) == 0


async def test_permissions(client, admin, auth, models):
    sub = await create_sub(client, admin)
    url = f"/v2/models/source/event-subscriptions/{sub['id']}"
    reader = auth(scopes=["read_models"])
    assert (await client.get("/v2/models/source/event-subscriptions", headers=reader)).status_code == 200
    assert (await client.get(url, headers=reader)).status_code == 200
    assert (
        await client.post("/v2/models/source/event-subscriptions", json=sub_body(), headers=reader)
    ).status_code == 403
    assert (await client.put(url, json={"label": "x"}, headers=reader)).status_code == 403
    assert (await client.delete(url, headers=reader)).status_code == 403
    assert (await client.get(url, headers=auth(scopes=["run_inference"]))).status_code == 403
    assert (await client.get(url)).status_code == 401
    assert (await client.delete(url)).status_code == 401
    manager = auth(scopes=["manage_models"])
    assert (await client.put(url, json={"label": "x"}, headers=manager)).status_code == 200
    assert (await client.delete(url, headers=manager)).status_code == 204


async def test_replay_subscriptions_are_visible_only_to_their_tenant(client, admin, auth, models, session):
    await session.execute(
        text(
            "INSERT INTO clients (client_id, name) VALUES ('sealink', 'SeaLink'), ('other', 'Other');"
            "INSERT INTO domains (client_id, domain_id) VALUES ('sealink', 'pricing')"
        )
    )
    replay_id = uuid.uuid4()
    await session.execute(
        text(
            "INSERT INTO event_subscriptions (id, source_model_id, trigger_event, target_model_id, target_action,"
            " input_source, input, client_id, domain_id, assignment_key) VALUES (:id, 'source', 'training_complete',"
            " 'source', 'inference', 'stored', '{\"route\": \"x\"}', 'sealink', 'pricing', 'default')"
        ),
        {"id": replay_id},
    )
    await session.commit()
    plain = await create_sub(client, admin)

    tenant_human = auth(groups=["client:sealink"], username="alice")
    other_human = auth(groups=["client:other"], username="bob")
    r = await client.get("/v2/models/source/event-subscriptions", headers=tenant_human)
    assert {s["id"] for s in r.json()} == {plain["id"], str(replay_id)}
    replay = next(s for s in r.json() if s["id"] == str(replay_id))
    assert replay["client_id"] == "sealink" and replay["assignment_key"] == "default"
    r = await client.get("/v2/models/source/event-subscriptions", headers=other_human)
    assert [s["id"] for s in r.json()] == [plain["id"]]
    r = await client.get(f"/v2/models/source/event-subscriptions/{replay_id}", headers=other_human)
    assert r.status_code == 404
    r = await client.get(f"/v2/models/source/event-subscriptions/{replay_id}", headers=admin)
    assert r.status_code == 200
    # a machine manager without that tenant cannot touch it
    manager = auth(scopes=["manage_models"], client_id="other")
    r = await client.delete(f"/v2/models/source/event-subscriptions/{replay_id}", headers=manager)
    assert r.status_code == 404
    manager = auth(scopes=["manage_models"], client_id="sealink")
    r = await client.delete(f"/v2/models/source/event-subscriptions/{replay_id}", headers=manager)
    assert r.status_code == 204


# ---- inference loops ---------------------------------------------------------------------------


def loop_body(target, **overrides):
    body = sub_body(trigger_event="inference_complete", target_model_id=target, target_action="inference")
    body.update(overrides)
    return body


async def test_a_subscription_closing_an_inference_loop_is_422(client, admin, session, models):
    """inference_complete -> inference subscriptions that lead back to their source would fire
    for ever (and multiply with two of them): creating or re-activating the edge that closes such
    a loop is 422; nothing is stored."""
    url = "/v2/models/{}/event-subscriptions"
    for model_id in ("a", "b", "c"):
        body = {"id": model_id, "name": model_id, "description": "", "handlers": {"training": ECHO, "inference": ECHO}}
        assert (await client.post("/v2/models", json=body, headers=admin)).status_code == 201

    r = await client.post(url.format("a"), json=loop_body("a"), headers=admin)
    assert r.status_code == 422 and "inference loop (a -> a)" in r.json()["message"], r.text
    r = await client.post(
        url.format("a"), json=loop_body("a", input_source="trigger_output", input=None), headers=admin
    )
    assert r.status_code == 422
    assert (await client.post(url.format("a"), json=loop_body("b"), headers=admin)).status_code == 201
    assert (await client.post(url.format("b"), json=loop_body("c"), headers=admin)).status_code == 201
    r = await client.post(url.format("c"), json=loop_body("a"), headers=admin)
    assert r.status_code == 422 and "c -> a -> b -> c" in r.json()["message"], r.text
    assert await session.scalar(text("SELECT count(*) FROM event_subscriptions WHERE source_model_id = 'c'")) == 0

    # edges that cannot chain are fine: training targets, training_complete triggers, paused ones
    assert (
        await client.post(url.format("c"), json=loop_body("a", target_action="training"), headers=admin)
    ).status_code == 201
    r = await client.post(url.format("c"), json=loop_body("a", trigger_event="training_complete"), headers=admin)
    assert r.status_code == 201
    r = await client.post(url.format("c"), json=loop_body("a", status="paused"), headers=admin)
    assert r.status_code == 201
    # ... until the paused one is activated
    paused = r.json()["id"]
    r = await client.put(url.format("c") + f"/{paused}", json={"status": "active"}, headers=admin)
    assert r.status_code == 422
    assert (await client.get(url.format("c") + f"/{paused}", headers=admin)).json()["status"] == "paused"
    # pausing a link of the loop lets it through
    b_to_c = (await client.get(url.format("b"), headers=admin)).json()[0]["id"]
    assert (
        await client.put(url.format("b") + f"/{b_to_c}", json={"status": "paused"}, headers=admin)
    ).status_code == 200
    assert (
        await client.put(url.format("c") + f"/{paused}", json={"status": "active"}, headers=admin)
    ).status_code == 200
    # and now re-activating the paused link is the one refused
    assert (
        await client.put(url.format("b") + f"/{b_to_c}", json={"status": "active"}, headers=admin)
    ).status_code == 422


async def test_concurrent_halves_of_a_loop_do_not_both_succeed(client, admin, session, models):
    import asyncio

    for model_id in ("x", "y"):
        body = {"id": model_id, "name": model_id, "description": "", "handlers": {"training": ECHO, "inference": ECHO}}
        assert (await client.post("/v2/models", json=body, headers=admin)).status_code == 201
    results = await asyncio.gather(
        client.post("/v2/models/x/event-subscriptions", json=loop_body("y"), headers=admin),
        client.post("/v2/models/y/event-subscriptions", json=loop_body("x"), headers=admin),
    )
    assert sorted(r.status_code for r in results) == [201, 422]
