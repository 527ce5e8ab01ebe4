"""Firing subscriptions (spec 7.2 / 8): training -> active fires the model's active
training_complete subscriptions, jobs land on the target's newest active version, replay
subscriptions re-run through their assignment key, failures are isolated per firing."""

from __future__ import annotations

import json
import uuid

import pytest
from sqlalchemy import text

from pie import db
from pie.jobs.firing import fire_subscriptions

ECHO = {"type": "in_process", "value": "echo"}


async def make_model(client, admin, model_id, contracts=None):
    body = {"id": model_id, "name": model_id, "description": "", "handlers": {"training": ECHO, "inference": ECHO}}
    if contracts is not None:
        body["handler_contracts"] = contracts
    r = await client.post("/v2/models", json=body, headers=admin)
    assert r.status_code == 201, r.text


async def add_version(client, admin, model_id, version, *statuses):
    r = await client.post(f"/v2/models/{model_id}/new_version", json={"version": version}, headers=admin)
    assert r.status_code == 201, r.text
    last = None
    for status in statuses:
        last = await client.post(
            f"/v2/models/{model_id}/versions/{version}/new_status", json={"status": status}, headers=admin
        )
        assert last.status_code == 200, last.text
    return last


async def subscribe(client, admin, source, target, **overrides):
    body = {
        "trigger_event": "training_complete",
        "target_model_id": target,
        "target_action": "inference",
        "input_source": "stored",
        "input": {"route": "Adelaide to Sydney"},
    } | overrides
    body = {k: v for k, v in body.items() if v is not ...}
    r = await client.post(f"/v2/models/{source}/event-subscriptions", json=body, headers=admin)
    assert r.status_code == 201, r.text
    return r.json()["id"]


async def activate(client, admin, model_id, version):
    r = await client.post(
        f"/v2/models/{model_id}/versions/{version}/new_status", json={"status": "active"}, headers=admin
    )
    assert r.status_code == 200, r.text
    return r.json()


async def jobs(session, **where):
    clause = " AND ".join(f"{k} = :{k}" for k in where) or "true"
    rows = await session.execute(text(f"SELECT * FROM jobs WHERE {clause} ORDER BY job_id"), where)
    return [dict(r._mapping) for r in rows]


async def test_training_to_active_fires_active_training_complete_subscriptions(client, admin, session):
    await make_model(client, admin, "trainer")
    await make_model(client, admin, "consumer")
    await add_version(client, admin, "consumer", "1", "active")
    await add_version(client, admin, "consumer", "2", "active")  # newest active: "2"
    await add_version(client, admin, "consumer", "3")  # pending: not a target
    stored = await subscribe(client, admin, "trainer", "consumer")
    from_output = await subscribe(client, admin, "trainer", "consumer", input_source="trigger_output", input=...)
    retrain = await subscribe(client, admin, "trainer", "consumer", target_action="training", input={"epochs": 3})
    paused = await subscribe(client, admin, "trainer", "consumer", status="paused")
    on_inference = await subscribe(client, admin, "trainer", "consumer", trigger_event="inference_complete")
    await subscribe(client, admin, "consumer", "consumer")  # another source

    await add_version(client, admin, "trainer", "1", "training")
    # the version's training jobs: the latest successful one's output is the trigger output
    await session.execute(
        text(
            "INSERT INTO jobs (job_type, status, model_id, model_version, output, completed_at) VALUES"
            " ('training', 'success', 'trainer', '1', '{\"weights\": \"old\"}', now() - interval '1 hour'),"
            " ('training', 'success', 'trainer', '1', '{\"weights\": \"new\"}', now()),"
            " ('training', 'failure', 'trainer', '1', NULL, now() + interval '1 minute')"
        )
    )
    await session.commit()

    body = await activate(client, admin, "trainer", "1")
    assert body["model"]["status"] == "active" and body["version"]["status"] == "active"
    events = body["triggered_events"]
    assert [e["subscription_id"] for e in events] == [stored, from_output, retrain]
    assert all(set(e) == {"subscription_id", "job_id"} for e in events)

    created = {j["subscription_id"]: j for j in await jobs(session, model_id="consumer")}
    assert set(map(str, created)) == {stored, from_output, retrain}
    by_sub = {str(k): v for k, v in created.items()}
    for sub_id, event in zip((stored, from_output, retrain), events):
        job = by_sub[sub_id]
        assert job["job_id"] == event["job_id"]
        assert job["model_version"] == "2" and job["status"] == "pending"
        assert job["client_id"] is None and job["assignment_id"] is None
    assert by_sub[stored]["job_type"] == "inference" and by_sub[stored]["input"] == {"route": "Adelaide to Sydney"}
    assert by_sub[from_output]["input"] == {"weights": "new"}
    assert by_sub[retrain]["job_type"] == "training" and by_sub[retrain]["input"] == {"epochs": 3}
    assert paused not in by_sub and on_inference not in by_sub


async def test_without_training_output_the_trigger_output_is_empty(client, admin, session):
    await make_model(client, admin, "m")
    await add_version(client, admin, "m", "1", "training")
    sub = await subscribe(client, admin, "m", "m", input_source="trigger_output", input=...)
    body = await activate(client, admin, "m", "1")
    assert [e["subscription_id"] for e in body["triggered_events"]] == [sub]
    (job,) = await jobs(session, model_id="m")
    assert job["input"] == {} and job["model_version"] == "1"


@pytest.mark.parametrize("path", [["active"], ["training", "failed", "training"]])
async def test_other_transitions_fire_nothing(client, admin, session, path):
    await make_model(client, admin, "m")
    await subscribe(client, admin, "m", "m")
    last = await add_version(client, admin, "m", "1", *path)
    assert last.json()["triggered_events"] == []
    assert await jobs(session) == []


async def test_paused_and_stale_subscriptions_never_fire(client, admin, session):
    await make_model(client, admin, "source")
    await make_model(client, admin, "target")
    await add_version(client, admin, "target", "1", "active")
    paused = await subscribe(client, admin, "source", "target", status="paused")
    stale = await subscribe(client, admin, "source", "target")
    live = await subscribe(client, admin, "source", "target", target_action="training")
    # changing the target's inference handler stales `stale`; paused ones go stale too
    r = await client.put(
        "/v2/models/target",
        json={
            "name": "t",
            "description": "",
            "handlers": {"training": ECHO, "inference": {"type": "in_process", "value": "reference_pricing"}},
        },
        headers=admin,
    )
    assert r.status_code == 200 and r.json()["new_version"]["version"] == "2"
    listed = (await client.get("/v2/models/source/event-subscriptions", headers=admin)).json()
    assert {s["id"]: s["status"] for s in listed} == {paused: "stale", stale: "stale", live: "active"}

    await add_version(client, admin, "source", "1", "training")
    body = await activate(client, admin, "source", "1")
    assert [e["subscription_id"] for e in body["triggered_events"]] == [live]
    assert [str(j["subscription_id"]) for j in await jobs(session, model_id="target")] == [live]


async def test_one_failing_target_never_stops_the_others(client, admin, session):
    await make_model(client, admin, "source")
    await make_model(client, admin, "no_active")
    await make_model(client, admin, "target", contracts={"inference": {"input_schema": {"required": ["route"]}}})
    await add_version(client, admin, "no_active", "1")  # pending only
    await add_version(client, admin, "target", "1", "active")
    broken = await subscribe(client, admin, "source", "no_active")
    ok = await subscribe(client, admin, "source", "target")
    mismatched = await subscribe(client, admin, "source", "target", input={"day": 1})
    await add_version(client, admin, "source", "1", "training")

    body = await activate(client, admin, "source", "1")
    events = {e["subscription_id"]: e for e in body["triggered_events"]}
    assert set(events[broken]) == {"subscription_id", "error"}
    assert "no active version" in events[broken]["error"]
    assert "job_id" in events[ok] and "job_id" in events[mismatched]
    created = {str(j["subscription_id"]): j for j in await jobs(session)}
    assert set(created) == {ok, mismatched}
    # the stored input that no longer matches the target contract runs, with a warning
    assert created[ok]["warnings"] == []
    assert len(created[mismatched]["warnings"]) == 1 and "route" in created[mismatched]["warnings"][0]
    # the status change itself is committed
    r = await client.get("/v2/models/source/versions/1", headers=admin)
    assert r.json()["status"] == "active"


async def test_a_database_failure_of_one_firing_is_isolated(client, admin, session):
    """A row the database rejects (here: a trigger refusing one input) becomes that firing's
    error entry; the other firings' jobs are still recorded."""
    await make_model(client, admin, "source")
    await make_model(client, admin, "target")
    await add_version(client, admin, "target", "1", "active")
    first = await subscribe(client, admin, "source", "target", input={"n": 1})
    poison = await subscribe(client, admin, "source", "target", input={"poison": True})
    last = await subscribe(client, admin, "source", "target", input={"n": 3})
    await add_version(client, admin, "source", "1", "training")
    await session.execute(
        text(
            "CREATE FUNCTION test_reject_poison() RETURNS trigger LANGUAGE plpgsql AS $$"
            " BEGIN IF NEW.input ? 'poison' THEN RAISE EXCEPTION 'poisoned input'; END IF; RETURN NEW; END $$;"
            "CREATE TRIGGER test_reject_poison BEFORE INSERT ON jobs FOR EACH ROW EXECUTE FUNCTION test_reject_poison()"
        )
    )
    await session.commit()
    try:
        body = await activate(client, admin, "source", "1")
    finally:
        await session.execute(text("DROP TRIGGER test_reject_poison ON jobs; DROP FUNCTION test_reject_poison()"))
        await session.commit()
    events = {e["subscription_id"]: e for e in body["triggered_events"]}
    assert "poisoned input" in events[poison]["error"]
    assert "job_id" in events[first] and "job_id" in events[last]
    assert {str(j["subscription_id"]) for j in await jobs(session)} == {first, last}


async def test_trigger_output_that_is_not_an_object_is_an_error_entry(engine, client, admin, session):
    await make_model(client, admin, "m")
    await make_model(client, admin, "n")
    await add_version(client, admin, "n", "1", "active")
    # (m -> m would be an inference loop, refused)
    from_output = await subscribe(
        client, admin, "m", "n", trigger_event="inference_complete", input_source="trigger_output", input=...
    )
    stored = await subscribe(client, admin, "m", "n", trigger_event="inference_complete")
    async with db.sessionmaker()() as s, s.begin():
        entries = await fire_subscriptions(
            s, source_model_id="m", trigger_event="inference_complete", trigger_output=[1, 2], source_model_version="1"
        )
    events = {e["subscription_id"]: e for e in entries}
    assert "not an object" in events[from_output]["error"]
    assert "job_id" in events[stored]
    assert [str(j["subscription_id"]) for j in await jobs(session)] == [stored]


async def test_fire_subscriptions_with_nothing_to_fire(engine, session):
    assert (
        await fire_subscriptions(session, source_model_id="none", trigger_event="training_complete", trigger_output={})
        == []
    )


# ---- replay subscriptions (subscribe: true on an assignment job) -----------------------------


async def tenant(session, *, domain_status="active", client_status="active"):
    await session.execute(
        text("INSERT INTO clients (client_id, name, status) VALUES ('sealink', 'SeaLink', :cs)"), {"cs": client_status}
    )
    await session.execute(
        text("INSERT INTO domains (client_id, domain_id, status) VALUES ('sealink', 'pricing', :ds)"),
        {"ds": domain_status},
    )
    await session.execute(
        text(
            "INSERT INTO services (client_id, domain_id, service_id, status, resolved_features)"
            " VALUES ('sealink', 'pricing', 'svc-1', 'available', '{\"route\": \"Adelaide to Sydney\", \"competitor_count\": 3}')"
        )
    )


async def assign(session, key, model_id, version, *, service_id=None, status="active") -> uuid.UUID:
    return await session.scalar(
        text(
            "INSERT INTO assignments (client_id, domain_id, service_id, assignment_key, model_id, model_version, status)"
            " VALUES ('sealink', 'pricing', :service_id, :key, :model_id, :version, :status) RETURNING assignment_id"
        ),
        {"service_id": service_id, "key": key, "model_id": model_id, "version": version, "status": status},
    )


async def replay(session, model_id, key, *, service_id=None, input=None) -> str:
    sub_id = uuid.uuid4()
    await session.execute(
        text(
            "INSERT INTO event_subscriptions (id, source_model_id, trigger_event, target_model_id, target_action,"
            " input_source, input, client_id, domain_id, service_id, assignment_key) VALUES (:id, :m,"
            " 'training_complete', :m, 'inference', 'stored', CAST(:input AS jsonb), 'sealink', 'pricing', :service_id, :key)"
        ),
        {"id": sub_id, "m": model_id, "input": json.dumps(input or {"q": 1}), "service_id": service_id, "key": key},
    )
    return str(sub_id)


async def test_replay_runs_through_the_assignment_key(client, admin, session):
    await make_model(client, admin, "m")
    await make_model(client, admin, "other")
    await add_version(client, admin, "m", "1", "active")
    await add_version(client, admin, "other", "7", "active")
    await add_version(client, admin, "m", "2", "training")
    await tenant(session)
    # the keys point at other versions than the one being activated
    domain_assignment = await assign(session, "default", "m", "1")
    service_assignment = await assign(session, "forecast", "other", "7", service_id="svc-1")
    await assign(session, "retired", "m", "1", status="archived")
    domain_sub = await replay(session, "m", "default", input={"route": "Sydney to Adelaide"})
    service_sub = await replay(session, "m", "forecast", service_id="svc-1")
    retired_sub = await replay(session, "m", "retired")
    missing_sub = await replay(session, "m", "forecast")  # no such key in domain scope
    await session.commit()

    body = await activate(client, admin, "m", "2")
    events = {e["subscription_id"]: e for e in body["triggered_events"]}
    assert "job_id" in events[domain_sub] and "job_id" in events[service_sub]
    assert "no active revision" in events[retired_sub]["error"]
    assert "no active revision" in events[missing_sub]["error"]

    created = {str(j["subscription_id"]): j for j in await jobs(session)}
    assert set(created) == {domain_sub, service_sub}
    d = created[domain_sub]
    assert (d["model_id"], d["model_version"], d["assignment_id"]) == ("m", "1", domain_assignment)
    assert (d["client_id"], d["domain_id"], d["service_id"]) == ("sealink", "pricing", None)
    assert d["input"] == {"route": "Sydney to Adelaide"} and d["features"] is None
    s = created[service_sub]
    assert (s["model_id"], s["model_version"], s["assignment_id"]) == ("other", "7", service_assignment)
    assert (s["client_id"], s["domain_id"], s["service_id"]) == ("sealink", "pricing", "svc-1")
    assert s["features"] == {"route": "Adelaide to Sydney", "competitor_count": 3}


@pytest.mark.parametrize(
    "setup, message",
    [
        ({"domain_status": "inactive"}, "inactive"),
        ({"client_status": "suspended"}, "suspended"),
    ],
)
async def test_replay_into_an_unusable_scope_is_an_error_entry(client, admin, session, setup, message):
    await make_model(client, admin, "m")
    await add_version(client, admin, "m", "1", "active")
    await add_version(client, admin, "m", "2", "training")
    await tenant(session, **setup)
    await assign(session, "default", "m", "1")
    sub = await replay(session, "m", "default")
    await session.commit()
    body = await activate(client, admin, "m", "2")
    assert body["triggered_events"][0]["subscription_id"] == sub
    assert message in body["triggered_events"][0]["error"]
    assert await jobs(session) == []


async def test_inference_complete_fires_through_job_completion(client, admin, session):
    """Integration with the completion route: a successful inference job fires the model's
    inference_complete subscriptions with its output as the trigger output."""
    await make_model(client, admin, "upstream")
    await make_model(client, admin, "downstream")
    await make_model(client, admin, "idle")
    await add_version(client, admin, "upstream", "1", "active")
    await add_version(client, admin, "downstream", "4", "active")
    chained = await subscribe(
        client,
        admin,
        "upstream",
        "downstream",
        trigger_event="inference_complete",
        input_source="trigger_output",
        input=...,
    )
    no_target = await subscribe(client, admin, "upstream", "idle", trigger_event="inference_complete")
    r = await client.post("/v2/models/upstream/versions/1/inference", json={"input": {"q": 1}}, headers=admin)
    job_id = r.json()["inference_job_id"]

    r = await client.post(
        f"/v2/models/upstream/versions/1/jobs/{job_id}/complete",
        json={"status": "success", "output": {"price": 101.5}},
        headers=admin,
    )
    assert r.status_code == 207, r.text  # one triggered subscription could not dispatch
    events = {e["subscription_id"]: e for e in r.json()["triggered_events"]}
    assert "no active version" in events[no_target]["error"]
    (job,) = await jobs(session, model_id="downstream")
    assert job["job_id"] == events[chained]["job_id"]
    assert job["input"] == {"price": 101.5} and job["model_version"] == "4"


async def test_a_batch_of_completions_fires_with_a_fixed_number_of_queries(engine, client, admin, session):
    """Ending many inference jobs at once (a dispatcher batch, e.g. after a batch re-init) fires
    their inference_complete subscriptions set-based: the same number of SQL statements for 3
    jobs as for 30, and every job's firing gets its own trigger output."""
    from sqlalchemy import event

    from pie.jobs.logic import Completion, create_job, finish_jobs

    await make_model(client, admin, "up")
    await make_model(client, admin, "down")
    await add_version(client, admin, "up", "1", "active")
    await add_version(client, admin, "down", "1", "active")
    chained = await subscribe(
        client, admin, "up", "down", trigger_event="inference_complete", input_source="trigger_output", input=...
    )
    stored = await subscribe(client, admin, "up", "down", trigger_event="inference_complete", input={"fixed": True})
    await tenant(session)
    await assign(session, "forecast", "down", "1", service_id="svc-1")
    replayed = await replay(session, "up", "forecast", service_id="svc-1")
    await session.execute(
        text("UPDATE event_subscriptions SET trigger_event = 'inference_complete' WHERE id = :id"), {"id": replayed}
    )
    await session.commit()

    async def end(n: int) -> tuple[int, list[str], dict]:
        ids = [
            (await create_job(session, job_type="inference", model_id="up", model_version="1")).job_id for _ in range(n)
        ]
        await session.commit()
        statements: list[str] = []

        def count(conn, cursor, statement, parameters, context, executemany):
            statements.append(statement)

        event.listen(engine.sync_engine, "before_cursor_execute", count)
        try:
            async with db.sessionmaker()() as s, s.begin():
                outcomes = await finish_jobs(
                    s, [Completion(job_id, "success", output={"n": i}) for i, job_id in enumerate(ids)]
                )
        finally:
            event.remove(engine.sync_engine, "before_cursor_execute", count)
        return len(statements), ids, outcomes

    few, _, _ = await end(3)
    many, ids, outcomes = await end(30)
    assert many == few

    created = {j["job_id"]: j for j in await jobs(session, model_id="down")}
    for i, job_id in enumerate(ids):
        events = {e["subscription_id"]: e["job_id"] for e in outcomes[job_id].triggered_events}
        assert set(events) == {chained, stored, replayed}
        assert created[events[chained]]["input"] == {"n": i}
        assert created[events[stored]]["input"] == {"fixed": True}
        replay_job = created[events[replayed]]
        assert (replay_job["service_id"], replay_job["features"]["competitor_count"]) == ("svc-1", 3)
    assert len(created) == 3 * 33


async def test_triggered_events_show_only_subscriptions_the_caller_may_see(client, admin, auth, session):
    """A replay subscription belongs to its tenant: when a non-admin's status change fires it, it
    still fires, but the caller's triggered_events leave it out (its entry names the tenant's
    domain, service and key), as listing and reading it are 404 for them."""
    await make_model(client, admin, "m")
    await make_model(client, admin, "consumer")
    await add_version(client, admin, "consumer", "1", "active")
    await add_version(client, admin, "m", "1", "active")
    await add_version(client, admin, "m", "2", "training")
    await add_version(client, admin, "m", "3", "training")
    public = await subscribe(client, admin, "m", "consumer")
    await tenant(session)
    await assign(session, "default", "m", "1")
    replayed = await replay(session, "m", "default")
    broken = await replay(session, "m", "forecast", service_id="svc-1")  # no such key: an error entry
    await session.commit()

    manager = auth(scopes=["manage_models"], client_id="other-tenant")
    r = await client.post("/v2/models/m/versions/2/new_status", json={"status": "active"}, headers=manager)
    assert r.status_code == 200, r.text
    assert [e["subscription_id"] for e in r.json()["triggered_events"]] == [public]
    assert "sealink" not in r.text and "svc-1" not in r.text
    # they fired all the same
    assert {str(j["subscription_id"]) for j in await jobs(session)} == {public, replayed}

    # the tenant's own machine token and admins see them
    own = auth(scopes=["manage_models"], client_id="sealink")
    r = await client.post("/v2/models/m/versions/3/new_status", json={"status": "active"}, headers=own)
    assert {e["subscription_id"] for e in r.json()["triggered_events"]} == {public, replayed, broken}
