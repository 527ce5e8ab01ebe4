"""Issue 17, spec 15.3: clear job and service states — ``error`` only on ``failure`` and retries
in ``dispatch``; batch re-init marks services ``initializing`` and says which job is whose;
replays fire on the retrained version, other firings on the most recently activated one;
updating a pending model changes its versions in place."""

from __future__ import annotations

from datetime import datetime

from factories import domain_url, init_service, make_client, make_version, tenant_setup
from sqlalchemy import text

from pie.dispatch.dispatcher import dispatch_until_idle

D = domain_url("client-1", "south_australia")
ECHO = {"type": "in_process", "value": "echo"}
FAIL = {"type": "in_process", "value": "fail"}
LAMBDA = {"type": "lambda", "arn": "arn:aws:lambda:us-east-1:123456789012:function:pricing"}


async def get_job(client, headers, job_id: str) -> dict:
    r = await client.get(f"/v2/jobs/{job_id}", headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


# -- error only on failure; retries in `dispatch` ------------------------------------------------------


async def test_a_retried_dispatch_is_pending_without_started_at_or_error(
    client, session, admin, settings, unused_tcp_port
):
    unreachable = settings.model_copy(
        update={
            "aws_endpoint_url": f"http://127.0.0.1:{unused_tcp_port}",
            "dispatch_max_attempts": 2,
            "dispatch_backoff_base": 300.0,
            "dispatch_backoff_max": 300.0,
        }
    )
    await make_version(session, "lam", handlers={"training": LAMBDA, "inference": LAMBDA})
    r = await client.post("/v2/models/lam/versions/1/inference", json={"input": {"x": 1}}, headers=admin)
    job_id = r.json()["inference_job_id"]
    fresh = await get_job(client, admin, job_id)
    assert fresh["status"] == "pending" and fresh["dispatch"] is None and fresh["error"] is None

    await dispatch_until_idle(unreachable)
    job = await get_job(client, admin, job_id)
    assert job["status"] == "pending" and job["started_at"] is None and job["error"] is None
    assert job["attempts"] == 1
    dispatch = job["dispatch"]
    assert dispatch["attempts"] == 1 and set(dispatch["last_error"]) == {"code", "message"}
    assert dispatch["last_error"]["code"] == "aws_unreachable"
    due = datetime.fromisoformat(dispatch["next_attempt_at"])
    assert (due - datetime.fromisoformat(job["updated_at"])).total_seconds() >= 149  # the backoff
    # the list shows the same
    listed = (await client.get("/v2/jobs?status=pending", headers=admin)).json()
    assert [j for j in listed if j["job_id"] == job_id] == [job]

    # the next attempt is the last: the job fails, and only now carries an error
    await session.execute(text("UPDATE jobs SET next_attempt_at = now() WHERE job_id = :j"), {"j": job_id})
    await session.commit()
    await dispatch_until_idle(unreachable)
    job = await get_job(client, admin, job_id)
    assert job["status"] == "failure" and job["error"]["code"] == "aws_unreachable"
    assert job["error"]["message"].startswith("gave up after 2 attempts")
    assert job["started_at"] is not None and job["attempts"] == 2
    assert job["dispatch"]["attempts"] == 2 and job["dispatch"]["next_attempt_at"] is None
    assert job["dispatch"]["last_error"]["code"] == "aws_unreachable"


async def test_jobs_that_never_failed_to_dispatch_have_no_dispatch_details(client, session, admin, settings):
    await tenant_setup(client, session, admin)
    job_id = (await init_service(client, admin, "s1", {"route": "Adelaide to Sydney"})).json()["job_id"]
    await dispatch_until_idle(settings)
    job = await get_job(client, admin, job_id)
    assert job["status"] == "success" and job["dispatch"] is None and job["error"] is None


# -- batch re-init ---------------------------------------------------------------------------------


async def service_status(client, headers, service_id: str) -> str:
    r = await client.get(f"{D}/service/{service_id}", headers=headers)
    assert r.status_code == 200, r.text
    return r.json()["status"]


async def test_batch_reinit_marks_services_initializing_and_names_each_job(client, session, admin, settings):
    await tenant_setup(client, session, admin)
    await init_service(client, admin, "b", {"route": "Adelaide to Sydney"})
    await init_service(client, admin, "a", {"route": "Sydney to Adelaide"})
    await dispatch_until_idle(settings)
    assert [await service_status(client, admin, s) for s in "ab"] == ["available", "available"]

    r = await client.post(f"{D}/services/init", headers=admin)
    assert r.status_code == 202
    body = r.json()
    assert body["dispatched_services"] == ["a", "b"]
    assert [j["service_id"] for j in body["jobs"]] == ["a", "b"]
    for entry in body["jobs"]:
        job = await get_job(client, admin, entry["job_id"])
        assert job["service_id"] == entry["service_id"] and job["status"] == "pending"
    assert [await service_status(client, admin, s) for s in "ab"] == ["initializing", "initializing"]

    await dispatch_until_idle(settings)
    assert [await service_status(client, admin, s) for s in "ab"] == ["available", "available"]


async def test_an_older_init_job_ending_does_not_end_a_newer_ones_initializing(client, session, admin, settings):
    await tenant_setup(client, session, admin)
    first = (await init_service(client, admin, "s", {"route": "Adelaide to Sydney"})).json()["job_id"]
    second = (await client.post(f"{D}/services/init", headers=admin)).json()["jobs"][0]["job_id"]
    r = await client.post(
        f"/v2/models/pricing-model/versions/1/jobs/{first}/complete", json={"status": "success"}, headers=admin
    )
    assert r.status_code == 200
    assert await service_status(client, admin, "s") == "initializing"  # the newer job still runs
    r = await client.post(
        f"/v2/models/pricing-model/versions/1/jobs/{second}/complete",
        json={"status": "failure", "error": {"code": "x", "message": "y"}},
        headers=admin,
    )
    assert r.status_code == 200
    assert await service_status(client, admin, "s") == "failed"


# -- which version a firing lands on ---------------------------------------------------------------------


async def make_model(client, admin, model_id: str, handlers=None) -> None:
    body = {
        "id": model_id,
        "name": model_id,
        "description": "",
        "handlers": handlers or {"training": ECHO, "inference": ECHO},
    }
    r = await client.post("/v2/models", json=body, headers=admin)
    assert r.status_code == 201, r.text


async def new_version(client, admin, model_id: str, version: str, *statuses: str) -> dict:
    r = await client.post(f"/v2/models/{model_id}/new_version", json={"version": version}, headers=admin)
    assert r.status_code == 201, r.text
    answer = r.json()
    for status in statuses:
        r = await client.post(
            f"/v2/models/{model_id}/versions/{version}/new_status", json={"status": status}, headers=admin
        )
        assert r.status_code == 200, r.text
        answer = r.json()
    return answer


async def test_a_models_own_training_complete_replay_runs_on_the_retrained_version(client, admin):
    await make_model(client, admin, "m")
    await new_version(client, admin, "m", "1")
    await new_version(client, admin, "m", "2", "active")  # the newest created active version
    # a replay of an inference on version 2 (`subscribe: true`): training_complete -> inference on m
    r = await client.post(
        "/v2/models/m/versions/2/inference", json={"input": {"q": 1}, "subscribe": True}, headers=admin
    )
    assert r.status_code == 202
    # version 1 is retrained
    for status in ("training", "active"):
        r = await client.post("/v2/models/m/versions/1/new_status", json={"status": status}, headers=admin)
        assert r.status_code == 200, r.text
    (event,) = r.json()["triggered_events"]
    job = await get_job(client, admin, event["job_id"])
    assert (job["model_id"], job["model_version"], job["input"]) == ("m", "1", {"q": 1})


async def test_other_firings_use_the_most_recently_activated_version(client, admin):
    await make_model(client, admin, "trainer")
    await make_model(client, admin, "consumer")
    await new_version(client, admin, "consumer", "1")
    await new_version(client, admin, "consumer", "2", "active")
    await client.post("/v2/models/consumer/versions/1/new_status", json={"status": "active"}, headers=admin)
    # newest created active: 2; most recently activated: 1
    for trigger in ("training_complete", "inference_complete"):
        r = await client.post(
            "/v2/models/trainer/event-subscriptions",
            json={
                "trigger_event": trigger,
                "target_model_id": "consumer",
                "target_action": "inference",
                "input_source": "stored",
                "input": {"from": trigger},
            },
            headers=admin,
        )
        assert r.status_code == 201, r.text
    r = await client.post("/v2/models/trainer/new_version", json={"version": "1"}, headers=admin)
    await client.post("/v2/models/trainer/versions/1/new_status", json={"status": "training"}, headers=admin)
    r = await client.post("/v2/models/trainer/versions/1/new_status", json={"status": "active"}, headers=admin)
    (event,) = r.json()["triggered_events"]
    assert (await get_job(client, admin, event["job_id"]))["model_version"] == "1"

    job_id = (await client.post("/v2/models/trainer/versions/1/inference", json={"input": {}}, headers=admin)).json()[
        "inference_job_id"
    ]
    r = await client.post(
        f"/v2/models/trainer/versions/1/jobs/{job_id}/complete", json={"status": "success", "output": {}}, headers=admin
    )
    (event,) = r.json()["triggered_events"]
    assert (await get_job(client, admin, event["job_id"]))["model_version"] == "1"


# -- updating a model that is not active -----------------------------------------------------------------


async def test_updating_a_pending_model_changes_its_versions_in_place(client, session, admin, settings):
    await make_model(client, admin, "m")
    await new_version(client, admin, "m", "1")
    await new_version(client, admin, "m", "2", "training", "failed")
    contracts = {"inference": {"input_schema": {"type": "object", "required": ["q"]}}}
    r = await client.put(
        "/v2/models/m",
        json={
            "name": "m",
            "description": "",
            "handlers": {"training": ECHO, "inference": FAIL},
            "handler_contracts": contracts,
        },
        headers=admin,
    )
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["status"] == "pending" and out["new_version"] is None
    assert out["updated_versions"] == ["1", "2"] and out["versions_keeping_old_handlers"] == []
    (row,) = (await client.get("/v2/audit?action=updatemodel", headers=admin)).json()
    assert row["summary"]["updated_versions"] == ["1", "2"]
    for version in ("1", "2"):
        got = (await client.get(f"/v2/models/m/versions/{version}", headers=admin)).json()
        assert got["handlers"]["inference"] == FAIL and got["handler_contracts"] == contracts
    # what GET shows is what runs: the new contract and the new handler
    r = await client.post("/v2/models/m/versions/1/inference", json={"input": {}}, headers=admin)
    assert r.status_code == 422 and "input_schema" in r.json()["message"]
    job_id = (await client.post("/v2/models/m/versions/1/inference", json={"input": {"q": 1}}, headers=admin)).json()[
        "inference_job_id"
    ]
    await dispatch_until_idle(settings)
    job = await get_job(client, admin, job_id)
    assert job["status"] == "failure" and job["error"]["code"] == "deliberate_failure"

    # once a version is active, an update generates a version and leaves the others alone
    await client.post("/v2/models/m/versions/1/new_status", json={"status": "active"}, headers=admin)
    r = await client.put(
        "/v2/models/m",
        json={"name": "m", "description": "", "handlers": {"training": ECHO, "inference": ECHO}},
        headers=admin,
    )
    out = r.json()
    assert out["updated_versions"] == [] and out["versions_keeping_old_handlers"] == ["1", "2"]
    assert out["new_version"]["version"] == "3" and out["new_version"]["handlers"]["inference"] == ECHO
    got = (await client.get("/v2/models/m/versions/1", headers=admin)).json()
    assert got["handlers"]["inference"] == FAIL


async def test_updating_a_pending_model_with_the_same_handlers_changes_nothing(client, session, admin):
    await make_client(session, "client-1")
    await make_model(client, admin, "m")
    await new_version(client, admin, "m", "1")
    before = (await client.get("/v2/models/m/versions/1", headers=admin)).json()
    r = await client.put(
        "/v2/models/m",
        json={
            "name": "renamed",
            "description": "",
            "handlers": {"training": ECHO, "inference": ECHO},
            "metadata": {"a": 1},
        },
        headers=admin,
    )
    assert r.json()["updated_versions"] == [] and r.json()["name"] == "renamed"
    assert (await client.get("/v2/models/m/versions/1", headers=admin)).json() == before
