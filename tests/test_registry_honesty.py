"""updatemodel says what happened to existing versions (a pending model's change in place); staleness follows the contract schemas
(input and output); the subscription status enum of the OpenAPI document and the server agree
(issue 9)."""

from __future__ import annotations

import pytest

ECHO = {"type": "in_process", "value": "echo"}
REF = {"type": "in_process", "value": "reference_pricing"}
OBJ = {"type": "object"}
ROUTE_SCHEMA = {"type": "object", "required": ["route"]}


def body(handlers=None, contracts=None, **extra):
    out = {"name": "m", "description": "", "handlers": handlers or {"training": ECHO, "inference": ECHO}, **extra}
    if contracts is not None:
        out["handler_contracts"] = contracts
    return out


async def create(client, admin, model_id, **kw):
    r = await client.post("/v2/models", json={"id": model_id, **body(**kw)}, headers=admin)
    assert r.status_code == 201, r.text


async def new_version(client, admin, model_id):
    r = await client.post(f"/v2/models/{model_id}/new_version", json={}, headers=admin)
    assert r.status_code == 201, r.text
    return r.json()["version"]["version"]


async def put(client, admin, model_id, **kw):
    r = await client.put(f"/v2/models/{model_id}", json=body(**kw), headers=admin)
    assert r.status_code == 200, r.text
    return r.json()


async def test_updatemodel_on_a_pending_model_updates_its_versions_in_place(client, admin):
    """Spec 15.3: no version was ever active, so the versions take the new handlers and
    contracts (what GET shows is what runs) and the answer lists them."""
    await create(client, admin, "m")
    v1 = await new_version(client, admin, "m")
    v2 = await new_version(client, admin, "m")
    out = await put(client, admin, "m", handlers={"training": ECHO, "inference": REF})
    assert out["new_version"] is None  # pending model: no version generated
    assert out["updated_versions"] == [v1, v2] and out["versions_keeping_old_handlers"] == []
    version = (await client.get(f"/v2/models/m/versions/{v1}", headers=admin)).json()
    assert version["handlers"]["inference"] == REF
    v3 = await new_version(client, admin, "m")
    out = await put(
        client,
        admin,
        "m",
        handlers={"training": ECHO, "inference": REF},
        contracts={"inference": {"input_schema": OBJ}},
    )
    assert out["updated_versions"] == [v1, v2, v3]
    version = (await client.get(f"/v2/models/m/versions/{v3}", headers=admin)).json()
    assert version["handler_contracts"] == {"inference": {"input_schema": OBJ}}
    # nothing about handlers or contracts changed: nothing to report
    out = await put(
        client,
        admin,
        "m",
        handlers={"training": ECHO, "inference": REF},
        contracts={"inference": {"input_schema": OBJ}},
        metadata={"x": 1},
    )
    assert out["versions_keeping_old_handlers"] == [] and out["updated_versions"] == []
    assert out["new_version"] is None


async def test_updatemodel_on_an_active_model_generates_a_version_and_says_so(client, admin):
    await create(client, admin, "m")
    v1 = await new_version(client, admin, "m")
    r = await client.post(f"/v2/models/m/versions/{v1}/new_status", json={"status": "active"}, headers=admin)
    assert r.status_code == 200
    out = await put(client, admin, "m", handlers={"training": ECHO, "inference": REF})
    assert out["new_version"]["handlers"]["inference"] == REF
    assert out["versions_keeping_old_handlers"] == [v1]


async def test_an_output_schema_change_stales_trigger_output_subscriptions_fed_by_it(client, admin):
    await create(client, admin, "source", contracts={"inference": {"output_schema": OBJ}})
    await create(client, admin, "target")

    async def subscribe(trigger, source_of_input, **extra):
        r = await client.post(
            "/v2/models/source/event-subscriptions",
            json={
                "trigger_event": trigger,
                "target_model_id": "target",
                "target_action": "inference",
                "input_source": source_of_input,
                **extra,
            },
            headers=admin,
        )
        assert r.status_code == 201, r.text
        return r.json()["id"]

    fed = await subscribe("inference_complete", "trigger_output")
    stored = await subscribe("inference_complete", "stored", input={"a": 1})
    after_training = await subscribe("training_complete", "trigger_output")
    out = await put(client, admin, "source", contracts={"inference": {"output_schema": ROUTE_SCHEMA}})
    assert out["stale_subscriptions"] == [fed]
    statuses = {
        s["id"]: s["status"] for s in (await client.get("/v2/models/source/event-subscriptions", headers=admin)).json()
    }
    assert statuses == {fed: "stale", stored: "active", after_training: "active"}
    # a training output_schema change stales the training_complete one
    out = await put(
        client,
        admin,
        "source",
        contracts={"inference": {"output_schema": ROUTE_SCHEMA}, "training": {"output_schema": OBJ}},
    )
    assert out["stale_subscriptions"] == [after_training]


async def test_an_input_schema_change_stales_subscriptions_targeting_the_action(client, admin):
    await create(client, admin, "target", contracts={"inference": {"input_schema": OBJ}})
    r = await client.post(
        "/v2/models/target/event-subscriptions",
        json={
            "trigger_event": "training_complete",
            "target_model_id": "target",
            "target_action": "inference",
            "input_source": "stored",
            "input": {"route": "x"},
        },
        headers=admin,
    )
    sid = r.json()["id"]
    out = await put(client, admin, "target", contracts={"inference": {"input_schema": ROUTE_SCHEMA}})
    assert out["stale_subscriptions"] == [sid]
    # re-activating a stale subscription is `status: active`
    r = await client.put(f"/v2/models/target/event-subscriptions/{sid}", json={"status": "active"}, headers=admin)
    assert r.status_code == 200 and r.json()["status"] == "active"


@pytest.mark.parametrize("status, accepted", [("active", True), ("paused", True), ("stale", False), (None, False)])
async def test_subscription_status_enum_matches_the_openapi_document(app, client, admin, status, accepted):
    schemas = app.openapi()["components"]["schemas"]

    def resolved(prop: dict) -> dict:  # enums are named components (README: Typed clients)
        ref = prop.get("$ref")
        return schemas[ref.rsplit("/", 1)[1]] if ref else prop

    request = resolved(schemas["SubscriptionUpdate"]["properties"]["status"])
    assert request.get("enum") == ["active", "paused"] and "anyOf" not in request  # null is not documented
    assert "anyOf" not in schemas["SubscriptionUpdate"]["properties"]["status"]
    response = resolved(schemas["SubscriptionOut"]["properties"]["status"])
    assert response.get("enum") == ["active", "paused", "stale"]
    documented = status in request["enum"]
    assert documented == accepted

    await create(client, admin, "m")
    r = await client.post(
        "/v2/models/m/event-subscriptions",
        json={
            "trigger_event": "training_complete",
            "target_model_id": "m",
            "target_action": "inference",
            "input_source": "stored",
            "input": {},
        },
        headers=admin,
    )
    sid = r.json()["id"]
    r = await client.put(f"/v2/models/m/event-subscriptions/{sid}", json={"status": status}, headers=admin)
    if accepted:
        assert r.status_code == 200 and r.json()["status"] == status
    else:
        assert r.status_code == 400 and "status" in r.json()["message"]
        assert (await client.get(f"/v2/models/m/event-subscriptions/{sid}", headers=admin)).json()["status"] == "active"
    # omitting status keeps it
    r = await client.put(f"/v2/models/m/event-subscriptions/{sid}", json={"label": "x"}, headers=admin)
    assert r.status_code == 200 and r.json()["status"] == (status if accepted else "active")
