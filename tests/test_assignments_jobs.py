"""Assignment job routes in both scopes (spec 9.1)."""

from __future__ import annotations

from factories import (
    SEVEN_FEATURES,
    assign,
    feature,
    fresh,
    init_service,
    jobs_of,
    make_version,
    racing_uncommitted,
    stored_job,
    tenant_setup,
)
from sqlalchemy import select, text

from pie.tables.registry import EventSubscription, Model, ModelVersion

D = "/v2/clients/client-1/domains/south_australia"
S = f"{D}/service/service-1"
SA = {"route": "Adelaide to Sydney", "competitor_count": 2}


async def version(session, v: str = "1") -> ModelVersion:
    return (await fresh(session, select(ModelVersion).where(ModelVersion.version == v)))[0]


async def setup(client, session, admin, **kw) -> dict:
    await tenant_setup(client, session, admin, **kw)
    await init_service(client, admin, "service-1", SA)
    return (await assign(client, admin, key="forecast", service_id="service-1")).json()


async def test_service_job_carries_the_resolved_features(client, session, admin):
    revision = await setup(client, session, admin)
    r = await client.post(f"{S}/assignments/forecast/jobs", json={"input": {"day_of_week": 3}}, headers=admin)
    assert r.status_code == 202, r.text
    assert set(r.json()) == {"job_id"}
    job = await stored_job(session, r.json()["job_id"])
    assert job.job_type == "inference" and job.status == "pending"
    assert str(job.assignment_id) == revision["assignment_id"]
    assert (job.model_id, job.model_version) == ("pricing-model", "1")
    assert (job.client_id, job.domain_id, job.service_id) == ("client-1", "south_australia", "service-1")
    assert job.input == {"day_of_week": 3} and job.features == SA
    assert job.purpose is None


async def test_domain_job_defaults(client, session, admin):
    await setup(client, session, admin)
    default = (await client.get(f"{D}/assignments/default", headers=admin)).json()
    for kwargs in ({"json": {}}, {}):  # an empty body and no body at all
        r = await client.post(f"{D}/assignments/default/jobs", headers=admin, **kwargs)
        assert r.status_code == 202, r.text
        job = await stored_job(session, r.json()["job_id"])
        assert job.job_type == "inference" and job.input == {} and job.features is None
        assert job.service_id is None and job.domain_id == "south_australia"
        assert str(job.assignment_id) == default["assignment_id"]
    subs = await fresh(session, select(EventSubscription))
    assert subs == []


async def test_unknown_and_archived_keys(client, session, admin):
    await setup(client, session, admin)
    r = await client.post(f"{D}/assignments/nothing/jobs", json={}, headers=admin)
    assert r.status_code == 404 and r.json()["success"] is False
    r = await client.post(f"{S}/assignments/nothing/jobs", json={}, headers=admin)
    assert r.status_code == 404
    # a domain key is not a service key
    await assign(client, admin, key="domain_only")
    assert (await client.post(f"{S}/assignments/domain_only/jobs", json={}, headers=admin)).status_code == 404
    assert (
        await client.post(f"{D}/service/ghost/assignments/forecast/jobs", json={}, headers=admin)
    ).status_code == 404
    assert (
        await client.post("/v2/clients/client-1/domains/ghost/assignments/default/jobs", json={}, headers=admin)
    ).status_code == 404

    await assign(client, admin, key="forecast", service_id="service-1", status="archived")
    r = await client.post(f"{S}/assignments/forecast/jobs", json={}, headers=admin)
    assert r.status_code == 422 and "archived" in r.json()["message"]
    await assign(client, admin, key="forecast", service_id="service-1")
    assert (await client.post(f"{S}/assignments/forecast/jobs", json={}, headers=admin)).status_code == 202


async def test_inactive_domain_and_suspended_client(client, session, admin):
    await setup(client, session, admin)
    jobs_before = len(await jobs_of(session))
    await client.patch(D, json={"status": "inactive"}, headers=admin)
    r = await client.post(f"{S}/assignments/forecast/jobs", json={}, headers=admin)
    assert r.status_code == 422 and "not active" in r.json()["message"]
    assert (await client.post(f"{D}/assignments/default/jobs", json={}, headers=admin)).status_code == 422
    await client.patch(D, json={"status": "active"}, headers=admin)
    await client.patch("/v2/clients/client-1", json={"status": "suspended"}, headers=admin)
    r = await client.post(f"{S}/assignments/forecast/jobs", json={}, headers=admin)
    assert r.status_code == 422 and "suspended" in r.json()["message"]
    assert len(await jobs_of(session)) == jobs_before


async def test_subscribe(client, session, admin):
    revision = await setup(client, session, admin)
    r = await client.post(
        f"{S}/assignments/forecast/jobs", json={"job_type": "training", "subscribe": True}, headers=admin
    )
    assert r.status_code == 422 and "subscribe" in r.json()["message"]
    assert await fresh(session, select(EventSubscription)) == []

    r = await client.post(
        f"{S}/assignments/forecast/jobs", json={"input": {"day_of_week": 5}, "subscribe": True}, headers=admin
    )
    assert r.status_code == 202
    job = await stored_job(session, r.json()["job_id"])
    assert str(job.assignment_id) == revision["assignment_id"]
    (sub,) = await fresh(session, select(EventSubscription))
    assert (sub.source_model_id, sub.target_model_id) == ("pricing-model", "pricing-model")
    assert (sub.trigger_event, sub.target_action, sub.input_source) == ("training_complete", "inference", "stored")
    assert sub.input == {"day_of_week": 5} and sub.status == "active"
    assert (sub.client_id, sub.domain_id, sub.service_id, sub.assignment_key) == (
        "client-1",
        "south_australia",
        "service-1",
        "forecast",
    )

    r = await client.post(f"{D}/assignments/default/jobs", json={"subscribe": True}, headers=admin)
    assert r.status_code == 202
    subs = await fresh(session, select(EventSubscription).where(EventSubscription.service_id.is_(None)))
    assert [(s.assignment_key, s.domain_id, s.input) for s in subs] == [("default", "south_australia", {})]
    # the subscription is visible through the registry's listing of the model
    r = await client.get("/v2/models/pricing-model/event-subscriptions", headers=admin)
    assert r.status_code == 200 and len(r.json()) == 2


async def test_subscribed_replays_are_registry_subscriptions(client, session, admin):
    """``subscribe: true`` stores the replay the way the registry stores every subscription: a
    time-ordered (UUIDv7) id, warnings when the input fails the model's current inference
    input_schema, and one replay for a repeated identical call (as direct inference does)."""
    await setup(client, session, admin)
    # the model's current contract (not the version's snapshot) wants day_of_week
    model = (await fresh(session, select(Model)))[0]
    model.handler_contracts = {"inference": {"input_schema": {"type": "object", "required": ["day_of_week"]}}}
    await session.commit()

    for _ in range(2):
        r = await client.post(
            f"{S}/assignments/forecast/jobs", json={"input": {"day": 1}, "subscribe": True}, headers=admin
        )
        assert r.status_code == 202, r.text
    r = await client.post(
        f"{D}/assignments/default/jobs", json={"input": {"day_of_week": 2}, "subscribe": True}, headers=admin
    )
    assert r.status_code == 202, r.text
    assert len(await jobs_of(session, job_type="inference", purpose=None)) == 3

    subs = await fresh(session, select(EventSubscription).order_by(EventSubscription.created_at))
    assert [(s.service_id, s.input) for s in subs] == [("service-1", {"day": 1}), (None, {"day_of_week": 2})]
    assert all(s.id.version == 7 for s in subs)
    assert subs[0].id < subs[1].id  # listing by id lists in creation order
    assert len(subs[0].warnings) == 1 and "day_of_week" in subs[0].warnings[0]
    assert subs[1].warnings == []
    r = await client.get("/v2/models/pricing-model/event-subscriptions", headers=admin)
    assert [s["id"] for s in r.json()] == [str(s.id) for s in subs]
    assert r.json()[0]["warnings"] == subs[0].warnings


async def test_input_is_validated_against_the_contract(client, session, admin):
    contracts = {
        "inference": {
            "input_schema": {
                "type": "object",
                "properties": {"day_of_week": {"type": "integer", "minimum": 0, "maximum": 6}},
                "required": ["day_of_week"],
            }
        },
        "training": {"input_schema": {"type": "object", "properties": {"epochs": {"type": "integer"}}}},
    }
    await setup(client, session, admin, handler_contracts=contracts)
    jobs_before = len(await jobs_of(session))
    for body in ({}, {"input": {"day_of_week": 9}}, {"input": {"day_of_week": "Mon"}}):
        r = await client.post(f"{S}/assignments/forecast/jobs", json=body, headers=admin)
        assert r.status_code == 422 and "input_schema" in r.json()["message"], r.text
    r = await client.post(
        f"{S}/assignments/forecast/jobs", json={"job_type": "training", "input": {"epochs": "x"}}, headers=admin
    )
    assert r.status_code == 422 and "training" in r.json()["message"]
    assert len(await jobs_of(session)) == jobs_before
    r = await client.post(f"{S}/assignments/forecast/jobs", json={"input": {"day_of_week": 3}}, headers=admin)
    assert r.status_code == 202
    r = await client.post(
        f"{S}/assignments/forecast/jobs", json={"job_type": "training", "input": {"epochs": 3}}, headers=admin
    )
    assert r.status_code == 202


async def test_bad_job_bodies_are_400(client, session, admin):
    await setup(client, session, admin)
    for body in ({"job_type": "predict"}, {"input": [1]}, {"subscribe": "yes"}, {"input": "x"}):
        r = await client.post(f"{S}/assignments/forecast/jobs", json=body, headers=admin)
        assert r.status_code == 400, body
    assert (await client.post(f"{S}/assignments/Bad/jobs", json={}, headers=admin)).status_code == 400


async def test_training_through_a_domain_assignment_never_writes_the_version(client, session, admin):
    """Spec 15.1: a job never writes a model version; the training job carries the domain's live
    features (``domain_features``) instead, and the governing schema stays the snapshot."""
    await setup(client, session, admin)
    assert (await version(session)).features is None
    r = await client.post(f"{S}/assignments/forecast/jobs", json={"job_type": "training"}, headers=admin)
    assert r.status_code == 202
    assert (await stored_job(session, r.json()["job_id"])).domain_features is None  # service scope
    r = await client.post(f"{D}/assignments/default/jobs", json={}, headers=admin)
    assert (await stored_job(session, r.json()["job_id"])).domain_features is None  # inference

    r = await client.post(
        f"{D}/assignments/default/jobs", json={"job_type": "training", "input": {"epochs": 1}}, headers=admin
    )
    assert r.status_code == 202
    job = await stored_job(session, r.json()["job_id"])
    assert job.job_type == "training" and job.input == {"epochs": 1} and job.domain_features == SEVEN_FEATURES
    assert (await version(session)).features is None

    # the live features change: the next training carries them; the deployed contract stays
    await client.put(f"{D}/features", json={"features": [feature("route", {"type": "string"}, True)]}, headers=admin)
    r = await client.post(f"{D}/assignments/default/jobs", json={"job_type": "training"}, headers=admin)
    assert (await stored_job(session, r.json()["job_id"])).domain_features == [
        feature("route", {"type": "string"}, True)
    ]
    assert (await version(session)).features is None
    r = await init_service(client, admin, "service-2", {"route": "Melbourne"}, expect=422)
    assert "route" in r.json()["message"]


async def test_training_does_not_overwrite_an_explicit_frozen_schema(client, session, admin):
    frozen = [feature("route", {"type": "string"}, True)]
    await make_version(session, version="2", features=frozen)
    await setup(client, session, admin)
    await assign(client, admin, key="retrain", model_version="2")
    await client.post(f"{D}/assignments/retrain/jobs", json={"job_type": "training"}, headers=admin)
    assert (await version(session, "2")).features == frozen


async def test_failed_version_refuses_jobs(client, session, admin):
    await setup(client, session, admin)
    await make_version(session, version="2")
    await assign(client, admin, key="forecast", model_version="2", service_id="service-1")
    v2 = await version(session, "2")
    v2.status = "failed"
    await session.commit()
    r = await client.post(f"{S}/assignments/forecast/jobs", json={}, headers=admin)
    assert r.status_code == 422 and "failed" in r.json()["message"]


async def test_job_permissions(client, session, admin, auth):
    await setup(client, session, admin)
    runner = auth(scopes=["run_inference"], client_id="client-1")
    manager = auth(scopes=["manage_domains", "init_services", "read_domains"], client_id="client-1")
    foreign = auth(scopes=["run_inference"], client_id="client-2")
    assert (await client.post(f"{S}/assignments/forecast/jobs", json={}, headers=runner)).status_code == 202
    assert (await client.post(f"{D}/assignments/default/jobs", json={}, headers=runner)).status_code == 202
    assert (await client.post(f"{S}/assignments/forecast/jobs", json={}, headers=manager)).status_code == 403
    assert (await client.post(f"{S}/assignments/forecast/jobs", json={}, headers=foreign)).status_code == 403
    human = auth(groups=["client:client-1"], username="ops")
    assert (await client.post(f"{S}/assignments/forecast/jobs", json={}, headers=human)).status_code == 202


async def test_a_launch_racing_a_suspension_is_refused_or_lands_first(client, session, admin, engine):
    """A suspension commits either before a job launch or write (which is then refused, 422)
    or after it has committed: never a job recorded after the client was suspended."""
    await setup(client, session, admin)
    jobs_before = len(await jobs_of(session))
    suspend = "UPDATE clients SET status = 'suspended', updated_at = now() WHERE client_id = 'client-1'"
    r = await racing_uncommitted(
        engine, suspend, {}, client.post(f"{S}/assignments/forecast/jobs", json={}, headers=admin)
    )
    assert r.status_code == 422 and "suspended" in r.json()["message"], r.text
    assert len(await jobs_of(session)) == jobs_before

    await client.patch("/v2/clients/client-1", json={"status": "active"}, headers=admin)
    r = await racing_uncommitted(
        engine,
        suspend,
        {},
        client.post(f"{D}/service/init", json={"service_id": "late", "static_features": SA}, headers=admin),
    )
    assert r.status_code == 422 and "suspended" in r.json()["message"], r.text
    assert len(await jobs_of(session)) == jobs_before


async def test_an_assignment_job_racing_its_version_failing_is_refused_or_lands_first(client, session, admin, engine):
    """The assignment's version stays locked until the job commits: a concurrent change to
    `failed` is either seen (422) or commits after the job — never a job recorded after it."""
    revision = await setup(client, session, admin)
    jobs_before = len(await jobs_of(session))
    fail = "UPDATE model_versions SET status = 'failed' WHERE model_id = :m AND version = :v"
    params = {"m": revision["model_id"], "v": revision["model_version"]}
    for job_type in ("inference", "training"):
        r = await racing_uncommitted(
            engine,
            fail,
            params,
            client.post(f"{S}/assignments/forecast/jobs", json={"job_type": job_type}, headers=admin),
        )
        assert r.status_code == 422 and "failed" in r.json()["message"], r.text
        assert len(await jobs_of(session)) == jobs_before
        await session.execute(
            text("UPDATE model_versions SET status = 'active' WHERE model_id = :m AND version = :v"), params
        )
        await session.commit()
