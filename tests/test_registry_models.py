"""Models (spec 7.1): list/get/create/update, handler and contract validation, permissions,
staleness of subscriptions on update, the generated version of an active model."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import text

LAMBDA_TRAIN = {"type": "lambda", "arn": "arn:aws:lambda:us-west-2:123456789012:function:train", "version": "1"}
LAMBDA_INFER = {"type": "lambda", "arn": "arn:aws:lambda:us-west-2:123456789012:function:infer"}
ECHO = {"type": "in_process", "value": "echo"}
ECS = {"type": "ecs_task", "value": "pricing/train-task:3"}
OBJ_SCHEMA = {"type": "object", "properties": {"route": {"type": "string"}}, "required": ["route"]}


def model_body(**overrides):
    body = {
        "id": "model_price_reco_v1",
        "name": "Price recommendation",
        "description": "Domain-level price model",
        "handlers": {"training": LAMBDA_TRAIN, "inference": LAMBDA_INFER},
        "metadata": {"team": "pricing"},
    }
    body.update(overrides)
    return body


def update_body(**overrides):
    """An updatemodel body: the model's fields without ``id`` (the path names the model; an
    unknown field is a 400)."""
    body = model_body(**overrides)
    body.pop("id", None)
    return body


async def create(client, admin, **overrides):
    r = await client.post("/v2/models", json=model_body(**overrides), headers=admin)
    assert r.status_code == 201, r.text
    return r.json()


async def activate_version(client, admin, model_id, version="1"):
    r = await client.post(f"/v2/models/{model_id}/new_version", json={"version": version}, headers=admin)
    assert r.status_code == 201, r.text
    r = await client.post(
        f"/v2/models/{model_id}/versions/{version}/new_status", json={"status": "active"}, headers=admin
    )
    assert r.status_code == 200, r.text


# ---- create / get / list ---------------------------------------------------------------------


async def test_create_and_get_model(client, admin):
    body = await create(client, admin)
    assert body["id"] == "model_price_reco_v1"
    assert body["status"] == "pending"
    assert body["handlers"] == {"training": LAMBDA_TRAIN, "inference": LAMBDA_INFER}
    assert body["handler_contracts"] is None
    assert body["metadata"] == {"team": "pricing"}
    assert body["created_at"].endswith("Z") and body["updated_at"].endswith("Z")

    r = await client.get("/v2/models/model_price_reco_v1", headers=admin)
    assert r.status_code == 200
    assert r.json() == body


async def test_create_generates_uuid7_id(client, admin):
    body = model_body()
    del body["id"]
    r = await client.post("/v2/models", json=body, headers=admin)
    assert r.status_code == 201, r.text
    generated = uuid.UUID(r.json()["id"])
    assert generated.version == 7
    r = await client.get(f"/v2/models/{generated}", headers=admin)
    assert r.status_code == 200


async def test_create_existing_model_is_409(client, admin):
    await create(client, admin)
    r = await client.post("/v2/models", json=model_body(name="other"), headers=admin)
    assert r.status_code == 409
    assert r.json()["success"] is False
    r = await client.get("/v2/models/model_price_reco_v1", headers=admin)
    assert r.json()["name"] == "Price recommendation"


async def test_all_three_handler_types_and_contracts(client, admin):
    contracts = {
        "training": {"input_schema": {"type": "object"}},
        "inference": {"input_schema": OBJ_SCHEMA, "output_schema": {"type": "object"}},
    }
    body = await create(client, admin, handlers={"training": ECS, "inference": ECHO}, handler_contracts=contracts)
    assert body["handlers"] == {"training": ECS, "inference": ECHO}
    assert body["handler_contracts"] == contracts


async def test_list_models_is_a_bare_array_with_cursor(client, admin):
    for i in range(5):
        await create(client, admin, id=f"m{i}")
    r = await client.get("/v2/models", headers=admin)
    assert r.status_code == 200
    assert [m["id"] for m in r.json()] == [f"m{i}" for i in range(5)]
    assert "x-next-cursor" not in r.headers

    seen = []
    cursor = None
    while True:
        params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        r = await client.get("/v2/models", params=params, headers=admin)
        assert r.status_code == 200
        page = r.json()
        assert len(page) <= 2
        seen += [m["id"] for m in page]
        cursor = r.headers.get("x-next-cursor")
        if not cursor:
            break
    assert seen == [f"m{i}" for i in range(5)]

    r = await client.get("/v2/models", params={"limit": 0}, headers=admin)
    assert r.status_code == 400
    r = await client.get("/v2/models", params={"cursor": "%%%not-a-cursor"}, headers=admin)
    assert r.status_code == 400


async def test_get_unknown_model_is_404(client, admin):
    r = await client.get("/v2/models/nope", headers=admin)
    assert r.status_code == 404
    assert r.json()["success"] is False


async def test_bad_model_id_in_path_is_400(client, admin):
    r = await client.get("/v2/models/bad$id", headers=admin)
    assert r.status_code == 400
    assert r.json()["success"] is False


# ---- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "handler",
    [
        {"type": "lambda", "arn": "not-an-arn"},
        {"type": "lambda", "arn": "arn:aws:lambda:us-west-2:1234:function:short-account"},
        {"type": "lambda", "arn": "arn:aws:s3:us-west-2:123456789012:function:wrong-service"},
        {"type": "lambda", "arn": "arn:aws:lambda:us-west-2:123456789012:function:f", "version": "bad version!"},
        {"type": "lambda", "arn": "arn:aws:lambda:us-west-2:123456789012:function:f:prod", "version": "2"},
        {"type": "ecs_task", "value": "no-slash"},
        {"type": "ecs_task", "value": "arn:aws:ecs:us-east-1:123456789012:cluster/c/task"},
        {"type": "ecs_task", "value": "cluster/"},
        {"type": "ecs_task", "value": "cluster/family:rev"},
        {"type": "in_process", "value": "no_such_implementation"},
    ],
)
async def test_malformed_handler_is_422(client, admin, handler):
    r = await client.post(
        "/v2/models", json=model_body(handlers={"training": handler, "inference": ECHO}), headers=admin
    )
    assert r.status_code == 422, r.text
    assert r.json()["success"] is False
    assert "training" in r.json()["message"]
    r = await client.get("/v2/models/model_price_reco_v1", headers=admin)
    assert r.status_code == 404


@pytest.mark.parametrize(
    "handler",
    [
        {"type": "lambda", "arn": "arn:aws:lambda:us-east-1:123456789012:function:my-fn"},
        {"type": "lambda", "arn": "arn:aws:lambda:us-east-1:123456789012:function:my-fn:live"},
        {"type": "lambda", "arn": "arn:aws:lambda:us-gov-west-1:123456789012:function:fn", "version": "$LATEST"},
        {"type": "ecs_task", "value": "cluster_1/family"},
        {"type": "ecs_task", "value": "cluster-1/family-name:12"},
        {"type": "in_process", "value": "reference_pricing"},
    ],
)
async def test_valid_handler_variants_are_accepted(client, admin, handler):
    r = await client.post(
        "/v2/models", json=model_body(handlers={"training": handler, "inference": ECHO}), headers=admin
    )
    assert r.status_code == 201, r.text
    assert r.json()["handlers"]["training"] == handler


@pytest.mark.parametrize(
    "overrides",
    [
        {"handlers": {"training": ECHO}},  # inference handler missing
        {"handlers": {"training": ECHO, "inference": {"type": "http", "value": "x"}}},  # unknown type
        {"handlers": {"training": ECHO, "inference": {"type": "lambda"}}},  # arn missing
        {"handlers": {"training": ECHO, "inference": {"type": "lambda", "arn": 5}}},  # wrong type
        {"handlers": "echo"},
        {"name": 12},
        {"metadata": []},
        {"handler_contracts": {"inference": {"input_schema": "not a schema object"}}},
        {"id": "bad id with spaces"},
    ],
)
async def test_wrong_json_types_are_400(client, admin, overrides):
    r = await client.post("/v2/models", json=model_body(**overrides), headers=admin)
    assert r.status_code == 400, r.text
    assert r.json()["success"] is False


async def test_missing_required_fields_and_malformed_json_are_400(client, admin):
    body = model_body()
    del body["name"]
    r = await client.post("/v2/models", json=body, headers=admin)
    assert r.status_code == 400
    r = await client.post("/v2/models", content=b"{not json", headers=admin | {"content-type": "application/json"})
    assert r.status_code == 400


async def test_invalid_contract_schema_is_422(client, admin):
    contracts = {"inference": {"input_schema": {"type": "no-such-type"}}}
    r = await client.post("/v2/models", json=model_body(handler_contracts=contracts), headers=admin)
    assert r.status_code == 422
    assert "inference.input_schema" in r.json()["message"]
    contracts = {"training": {"output_schema": {"minimum": "zero"}}}
    r = await client.post("/v2/models", json=model_body(handler_contracts=contracts), headers=admin)
    assert r.status_code == 422
    assert "training.output_schema" in r.json()["message"]


@pytest.mark.parametrize(
    "schema", [{"$ref": "#/$defs/missing"}, {"$ref": "http://127.0.0.1:9/schema.json"}, {"$ref": "urn:example:x"}]
)
async def test_contract_with_an_unresolvable_reference_is_422(client, admin, schema):
    """A contract that could never be applied is refused when it is written (not a 500 at the
    first inference or completion that needs it)."""
    contracts = {"inference": {"input_schema": schema}}
    r = await client.post("/v2/models", json=model_body(handler_contracts=contracts), headers=admin)
    assert r.status_code == 422, r.text
    assert "inference.input_schema" in r.json()["message"] and "cannot be resolved" in r.json()["message"]
    await create(client, admin)
    contracts = {"training": {"output_schema": schema}}
    r = await client.put("/v2/models/model_price_reco_v1", json=update_body(handler_contracts=contracts), headers=admin)
    assert r.status_code == 422, r.text
    assert (await client.get("/v2/models/model_price_reco_v1", headers=admin)).json()["handler_contracts"] is None
    # references inside the schema are fine
    contracts = {
        "inference": {
            "input_schema": {"$defs": {"r": {"type": "string"}}, "properties": {"route": {"$ref": "#/$defs/r"}}}
        }
    }
    r = await client.put("/v2/models/model_price_reco_v1", json=update_body(handler_contracts=contracts), headers=admin)
    assert r.status_code == 200, r.text


# ---- auth ------------------------------------------------------------------------------------


async def test_model_routes_need_a_token(client):
    assert (await client.get("/v2/models")).status_code == 401
    r = await client.post("/v2/models", json=model_body())
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    r = await client.get("/v2/models", headers={"Authorization": "Bearer garbage"})
    assert r.status_code == 401


async def test_model_permissions(client, admin, auth):
    await create(client, admin)
    reader = auth(scopes=["read_models"])
    r = await client.get("/v2/models", headers=reader)
    assert r.status_code == 200 and len(r.json()) == 1
    assert (await client.get("/v2/models/model_price_reco_v1", headers=reader)).status_code == 200
    r = await client.post("/v2/models", json=model_body(id="other"), headers=reader)
    assert r.status_code == 403
    r = await client.put("/v2/models/model_price_reco_v1", json=update_body(), headers=reader)
    assert r.status_code == 403

    # humans of a client group read models but may not manage them
    human = auth(groups=["client:sealink"], username="alice")
    assert (await client.get("/v2/models", headers=human)).status_code == 200
    assert (await client.post("/v2/models", json=model_body(id="x"), headers=human)).status_code == 403

    nothing = auth(scopes=["read_domains"])
    assert (await client.get("/v2/models", headers=nothing)).status_code == 403

    manager = auth(scopes=["streamline/manage_models"])
    r = await client.post("/v2/models", json=model_body(id="by-manager"), headers=manager)
    assert r.status_code == 201


# ---- update ----------------------------------------------------------------------------------


async def test_update_pending_model_replaces_fields_without_a_version(client, admin, session):
    await create(client, admin)
    body = model_body(name="Renamed", description="new", handlers={"training": ECHO, "inference": ECHO})
    del body["id"]
    del body["metadata"]
    r = await client.put("/v2/models/model_price_reco_v1", json=body, headers=admin)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["name"] == "Renamed" and out["description"] == "new"
    assert out["handlers"] == {"training": ECHO, "inference": ECHO}
    assert out["metadata"] == {}  # full replacement
    assert out["status"] == "pending"
    assert out["new_version"] is None
    count = await session.scalar(text("SELECT count(*) FROM model_versions"))
    assert count == 0


async def test_update_unknown_model_is_404_and_invalid_update_is_422(client, admin):
    r = await client.put("/v2/models/nope", json=update_body(), headers=admin)
    assert r.status_code == 404
    # the unknown model is the first thing to fix: 404 before any 422 about the body
    unknown_handler = {"training": ECHO, "inference": {"type": "in_process", "value": "missing"}}
    r = await client.put("/v2/models/nope", json=update_body(handlers=unknown_handler), headers=admin)
    assert r.status_code == 404, r.text
    await create(client, admin)
    bad = update_body(handlers={"training": ECHO, "inference": {"type": "in_process", "value": "missing"}})
    r = await client.put("/v2/models/model_price_reco_v1", json=bad, headers=admin)
    assert r.status_code == 422
    r = await client.get("/v2/models/model_price_reco_v1", headers=admin)
    assert r.json()["handlers"]["inference"] == LAMBDA_INFER


async def test_update_of_active_model_generates_pending_version(client, admin):
    await create(client, admin)
    await activate_version(client, admin, "model_price_reco_v1", "1")
    new_handlers = {"training": LAMBDA_TRAIN, "inference": ECHO}
    r = await client.put("/v2/models/model_price_reco_v1", json=update_body(handlers=new_handlers), headers=admin)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["status"] == "active"
    assert out["handlers"] == new_handlers
    new_version = out["new_version"]
    assert new_version["version"] == "2"
    assert new_version["status"] == "pending"
    assert new_version["handlers"] == new_handlers

    # the old version keeps its snapshot
    r = await client.get("/v2/models/model_price_reco_v1/versions/1", headers=admin)
    assert r.json()["handlers"]["inference"] == LAMBDA_INFER
    r = await client.get("/v2/models/model_price_reco_v1/versions", headers=admin)
    assert [v["version"] for v in r.json()] == ["1", "2"]

    # a change that touches neither handlers nor contracts makes no version
    r = await client.put(
        "/v2/models/model_price_reco_v1", json=update_body(handlers=new_handlers, name="just renamed"), headers=admin
    )
    assert r.status_code == 200
    assert r.json()["new_version"] is None and r.json()["name"] == "just renamed"

    # a contract change does
    r = await client.put(
        "/v2/models/model_price_reco_v1",
        json=update_body(handlers=new_handlers, handler_contracts={"inference": {"input_schema": OBJ_SCHEMA}}),
        headers=admin,
    )
    assert r.json()["new_version"]["version"] == "3"
    assert r.json()["new_version"]["handler_contracts"] == {"inference": {"input_schema": OBJ_SCHEMA}}


# ---- staleness -------------------------------------------------------------------------------


async def subscribe(client, admin, source, target, action, status="active"):
    r = await client.post(
        f"/v2/models/{source}/event-subscriptions",
        json={
            "trigger_event": "training_complete",
            "target_model_id": target,
            "target_action": action,
            "input_source": "stored",
            "input": {"route": "Adelaide to Sydney"},
            "status": status,
        },
        headers=admin,
    )
    assert r.status_code == 201, r.text
    return r.json()["id"]


async def statuses(client, admin, source):
    r = await client.get(f"/v2/models/{source}/event-subscriptions", headers=admin)
    return {s["id"]: s["status"] for s in r.json()}


async def test_handler_change_without_contracts_stales_that_action_only(client, admin):
    await create(client, admin, id="source")
    await create(client, admin, id="target")
    infer_active = await subscribe(client, admin, "source", "target", "inference")
    infer_paused = await subscribe(client, admin, "source", "target", "inference", status="paused")
    train = await subscribe(client, admin, "source", "target", "training")
    other = await subscribe(client, admin, "source", "source", "inference")

    r = await client.put(
        "/v2/models/target",
        json=update_body(handlers={"training": LAMBDA_TRAIN, "inference": ECHO}),
        headers=admin,
    )
    assert r.status_code == 200
    assert await statuses(client, admin, "source") == {
        infer_active: "stale",
        infer_paused: "stale",
        train: "active",
        other: "active",
    }

    # an update that changes nothing relevant stales nothing more
    r = await client.put(
        "/v2/models/target",
        json=update_body(name="x", handlers={"training": LAMBDA_TRAIN, "inference": ECHO}),
        headers=admin,
    )
    assert (await statuses(client, admin, "source"))[train] == "active"


async def test_with_contracts_only_input_schema_changes_stale(client, admin):
    contracts = {"training": {"input_schema": {"type": "object"}}, "inference": {"input_schema": OBJ_SCHEMA}}
    await create(client, admin, id="source")
    await create(client, admin, id="target", handler_contracts=contracts)
    infer = await subscribe(client, admin, "source", "target", "inference")
    train = await subscribe(client, admin, "source", "target", "training")

    # handler changes and output_schema changes do not stale when contracts exist
    changed = {
        "training": {"input_schema": {"type": "object"}, "output_schema": {"type": "array"}},
        "inference": {"input_schema": OBJ_SCHEMA},
    }
    r = await client.put(
        "/v2/models/target",
        json=update_body(handlers={"training": ECHO, "inference": ECHO}, handler_contracts=changed),
        headers=admin,
    )
    assert r.status_code == 200
    assert await statuses(client, admin, "source") == {infer: "active", train: "active"}

    # the training input_schema changes: training subscriptions go stale
    changed["training"]["input_schema"] = {"type": "object", "required": ["epochs"]}
    r = await client.put(
        "/v2/models/target",
        json=update_body(handlers={"training": ECHO, "inference": ECHO}, handler_contracts=changed),
        headers=admin,
    )
    assert await statuses(client, admin, "source") == {infer: "active", train: "stale"}

    # dropping the contracts changes the inference input_schema too
    r = await client.put(
        "/v2/models/target", json=update_body(handlers={"training": ECHO, "inference": ECHO}), headers=admin
    )
    assert await statuses(client, admin, "source") == {infer: "stale", train: "stale"}


async def test_contracts_without_any_schema_are_no_contracts(client, admin):
    """`handler_contracts` whose entries carry no schema at all is stored as no contracts (null),
    so staleness keeps following the handlers as for a model without contracts."""
    empty = {"training": {}, "inference": {"input_schema": None, "output_schema": None}}
    body = await create(client, admin, id="target", handler_contracts=empty)
    assert body["handler_contracts"] is None
    await create(client, admin, id="source")
    infer = await subscribe(client, admin, "source", "target", "inference")
    r = await client.put(
        "/v2/models/target",
        json=update_body(handlers={"training": LAMBDA_TRAIN, "inference": ECHO}, handler_contracts={"inference": {}}),
        headers=admin,
    )
    assert r.status_code == 200 and r.json()["handler_contracts"] is None
    assert await statuses(client, admin, "source") == {infer: "stale"}
    # a contract with one schema keeps just that entry
    only = {"training": {}, "inference": {"input_schema": OBJ_SCHEMA}}
    r = await client.put("/v2/models/target", json=update_body(handler_contracts=only), headers=admin)
    assert r.json()["handler_contracts"] == {"inference": {"input_schema": OBJ_SCHEMA}}
