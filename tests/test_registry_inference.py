"""Direct inference (spec 7.3): POST /v2/models/{id}/versions/{v}/inference."""

from __future__ import annotations

import pytest
from sqlalchemy import text

ECHO = {"type": "in_process", "value": "echo"}
CONTRACTS = {
    "inference": {
        "input_schema": {
            "type": "object",
            "properties": {"route": {"type": "string"}, "day_of_week": {"type": "integer", "minimum": 0, "maximum": 6}},
            "required": ["route"],
        }
    }
}


@pytest.fixture
async def model(client, admin):
    r = await client.post(
        "/v2/models",
        json={
            "id": "m",
            "name": "m",
            "description": "",
            "handlers": {"training": ECHO, "inference": ECHO},
            "handler_contracts": CONTRACTS,
        },
        headers=admin,
    )
    assert r.status_code == 201
    r = await client.post("/v2/models/m/new_version", json={}, headers=admin)
    assert r.status_code == 201


async def infer(client, headers, body, model_id="m", version="1"):
    return await client.post(f"/v2/models/{model_id}/versions/{version}/inference", json=body, headers=headers)


async def all_jobs(session):
    return [dict(r._mapping) for r in await session.execute(text("SELECT * FROM jobs ORDER BY job_id"))]


async def test_inference_records_a_job(client, admin, auth, session, model):
    runner = auth(scopes=["run_inference"])
    r = await infer(client, runner, {"input": {"route": "Adelaide to Sydney", "day_of_week": 3}})
    assert r.status_code == 202, r.text
    assert set(r.json()) == {"inference_job_id"}
    (job,) = await all_jobs(session)
    assert job["job_id"] == r.json()["inference_job_id"]
    assert job["job_type"] == "inference" and job["status"] == "pending"
    assert (job["model_id"], job["model_version"]) == ("m", "1")
    assert job["input"] == {"route": "Adelaide to Sydney", "day_of_week": 3}
    assert job["client_id"] is None and job["assignment_id"] is None and job["subscription_id"] is None
    assert await session.scalar(text("SELECT count(*) FROM event_subscriptions")) == 0


@pytest.mark.parametrize("path", [["training"], ["active"]])
async def test_inference_runs_on_any_version_that_has_not_failed(client, admin, session, model, path):
    for status in path:
        r = await client.post("/v2/models/m/versions/1/new_status", json={"status": status}, headers=admin)
        assert r.status_code == 200
    assert (await infer(client, admin, {"input": {"route": "x"}})).status_code == 202


async def test_failed_version_is_422(client, admin, session, model):
    for status in ("training", "failed"):
        await client.post("/v2/models/m/versions/1/new_status", json={"status": status}, headers=admin)
    r = await infer(client, admin, {"input": {"route": "x"}})
    assert r.status_code == 422
    assert "failed" in r.json()["message"]
    assert await all_jobs(session) == []


@pytest.mark.parametrize(
    "bad_input, culprit",
    [({}, "route"), ({"route": 5}, "route"), ({"route": "x", "day_of_week": 9}, "day_of_week")],
)
async def test_input_failing_the_contract_is_422(client, admin, session, model, bad_input, culprit):
    r = await infer(client, admin, {"input": bad_input, "subscribe": True})
    assert r.status_code == 422
    assert "input_schema" in r.json()["message"] and culprit in r.json()["message"]
    assert await all_jobs(session) == []
    assert await session.scalar(text("SELECT count(*) FROM event_subscriptions")) == 0


async def test_contract_is_the_versions_snapshot(client, admin, session, model):
    # an active model drops its contract; version 1 keeps its own (a pending model's versions
    # would take the change in place: spec 15.3, tests/test_true_states.py)
    r = await client.post("/v2/models/m/versions/1/new_status", json={"status": "active"}, headers=admin)
    assert r.status_code == 200
    r = await client.put(
        "/v2/models/m",
        json={"name": "m", "description": "", "handlers": {"training": ECHO, "inference": ECHO}},
        headers=admin,
    )
    assert r.status_code == 200
    assert (await infer(client, admin, {"input": {}})).status_code == 422
    r = await client.post("/v2/models/m/new_version", json={}, headers=admin)
    assert (await infer(client, admin, {"input": {}}, version="2")).status_code == 202


async def test_request_errors(client, admin, auth, model):
    assert (await infer(client, admin, {})).status_code == 400
    assert (await infer(client, admin, {"input": "text"})).status_code == 400
    assert (await infer(client, admin, {"input": {"route": "x"}, "subscribe": "yes"})).status_code == 400
    assert (await infer(client, admin, {"input": {"route": "x"}}, model_id="nope")).status_code == 404
    assert (await infer(client, admin, {"input": {"route": "x"}}, version="9")).status_code == 404
    assert (await infer(client, admin, {"input": {"route": "x"}}, version="b@d")).status_code == 400
    assert (
        await infer(client, auth(scopes=["read_models", "manage_models"]), {"input": {"route": "x"}})
    ).status_code == 403
    assert (await infer(client, {}, {"input": {"route": "x"}})).status_code == 401
    # humans of a client group may run inference; the job is their tenant's (spec 14.1), which
    # must exist
    human = auth(groups=["client:sealink"], username="alice")
    r = await infer(client, human, {"input": {"route": "x"}})
    assert r.status_code == 404 and "sealink" in r.json()["message"]
    assert (
        await client.post("/v2/clients", json={"client_id": "sealink", "name": "S"}, headers=admin)
    ).status_code == 201
    r = await infer(client, human, {"input": {"route": "x"}})
    assert r.status_code == 202
    assert (await client.get(f"/v2/jobs/{r.json()['inference_job_id']}", headers=human)).json()[
        "client_id"
    ] == "sealink"


async def test_subscribe_stores_a_replay_subscription(client, admin, session, model):
    payload = {"route": "Adelaide to Sydney"}
    r = await infer(client, admin, {"input": payload, "subscribe": True})
    assert r.status_code == 202
    subs = (await client.get("/v2/models/m/event-subscriptions", headers=admin)).json()
    assert len(subs) == 1
    sub = subs[0]
    assert sub["source_model_id"] == "m" and sub["target_model_id"] == "m"
    assert sub["trigger_event"] == "training_complete" and sub["target_action"] == "inference"
    assert sub["input_source"] == "stored" and sub["input"] == payload and sub["status"] == "active"
    assert sub["warnings"] == []

    # the same subscribed call again does not add a second replay; another input does
    assert (await infer(client, admin, {"input": payload, "subscribe": True})).status_code == 202
    assert (
        await infer(client, admin, {"input": {"route": "Sydney to Adelaide"}, "subscribe": True})
    ).status_code == 202
    subs = (await client.get("/v2/models/m/event-subscriptions", headers=admin)).json()
    assert [s["input"] for s in subs] == [payload, {"route": "Sydney to Adelaide"}]

    # after retraining, the stored inputs are replayed on the newly active version
    await client.post("/v2/models/m/new_version", json={}, headers=admin)
    for status in ("training", "active"):
        r = await client.post("/v2/models/m/versions/2/new_status", json={"status": status}, headers=admin)
    assert r.status_code == 200
    events = r.json()["triggered_events"]
    assert [e["subscription_id"] for e in events] == [s["id"] for s in subs]
    replayed = await session.execute(
        text("SELECT input, model_version FROM jobs WHERE subscription_id IS NOT NULL ORDER BY job_id")
    )
    assert sorted((row.input["route"], row.model_version) for row in replayed) == [
        ("Adelaide to Sydney", "2"),
        ("Sydney to Adelaide", "2"),
    ]


async def test_a_stored_contract_that_cannot_be_applied_is_422_not_500(client, admin, session, model):
    """A version whose snapshotted contract cannot be evaluated (stored before references were
    checked): inference input is refused with a clear 422, nothing is recorded."""
    await session.execute(
        text("UPDATE model_versions SET handler_contracts = CAST(:c AS jsonb) WHERE model_id = 'm'"),
        {"c": '{"inference": {"input_schema": {"$ref": "#/$defs/missing"}}}'},
    )
    await session.commit()
    r = await infer(client, admin, {"input": {"route": "x"}})
    assert r.status_code == 422, r.text
    assert "unresolvable reference" in r.json()["message"]
    assert await all_jobs(session) == []


async def test_a_number_too_large_for_the_contract_is_422_not_500(client, admin, session):
    body = {
        "id": "big",
        "name": "m",
        "description": "",
        "handlers": {"training": ECHO, "inference": ECHO},
        "handler_contracts": {"inference": {"input_schema": {"properties": {"n": {"multipleOf": 0.5}}}}},
    }
    assert (await client.post("/v2/models", json=body, headers=admin)).status_code == 201
    assert (await client.post("/v2/models/big/new_version", json={}, headers=admin)).status_code == 201
    r = await infer(client, admin, {"input": {"n": 10**400}}, model_id="big")
    assert r.status_code == 422, r.text
    assert (await infer(client, admin, {"input": {"n": 2.5}}, model_id="big")).status_code == 202


async def test_concurrent_identical_subscribed_calls_store_one_replay(client, admin, session, model):
    """The reuse of an identical subscription holds under concurrency: simultaneous identical
    `subscribe: true` calls leave one replay subscription (each still gets its job)."""
    import asyncio

    payload = {"route": "Adelaide to Sydney", "day_of_week": 2}
    results = await asyncio.gather(*(infer(client, admin, {"input": payload, "subscribe": True}) for _ in range(8)))
    assert [r.status_code for r in results] == [202] * 8
    subs = (await client.get("/v2/models/m/event-subscriptions", headers=admin)).json()
    assert [s["input"] for s in subs] == [payload]
    assert len(await all_jobs(session)) == 8


async def test_inference_racing_a_version_failing_is_refused_or_lands_first(client, admin, model, engine, session):
    """The version row is held FOR SHARE until the job commits: a status change to `failed` that
    is in flight commits first (the launch then sees it: 422) — never a job recorded for a
    version that had already failed."""
    from factories import racing_uncommitted

    fail = "UPDATE model_versions SET status = 'failed' WHERE model_id = 'm' AND version = '1'"
    r = await racing_uncommitted(engine, fail, {}, infer(client, admin, {"input": {"route": "x"}}))
    assert r.status_code == 422 and "failed" in r.json()["message"], r.text
    assert await session.scalar(text("SELECT count(*) FROM jobs")) == 0


@pytest.mark.parametrize(
    ("change", "refusal"),
    [
        ("UPDATE clients SET status = 'suspended' WHERE client_id = 'client-1'", "suspended"),
        ("UPDATE model_versions SET status = 'failed' WHERE model_id = 'm' AND version = '1'", "failed"),
    ],
    ids=["client suspended", "version failed"],
)
async def test_tenant_inference_racing_a_suspension_or_a_failure_is_refused(
    client, auth, model, engine, session, change, refusal
):
    """A tenant's launch holds its client row and the version row FOR SHARE until the job
    commits: a suspension of the tenant or a version turning `failed` that is in flight commits
    first and the launch then sees it (422) — never a job recorded for a tenant already
    suspended or a version already failed (whichever layer answers the request)."""
    from factories import make_client, racing_uncommitted

    await make_client(session, "client-1")
    tenant = auth(scopes=["run_inference"], client_id="client-1")
    r = await racing_uncommitted(engine, change, {}, infer(client, tenant, {"input": {"route": "x"}}))
    assert r.status_code == 422 and refusal in r.json()["message"], r.text
    assert await session.scalar(text("SELECT count(*) FROM jobs")) == 0
