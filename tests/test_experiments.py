"""Experiments on an assignment key (spec 15.7, issue 23), over HTTP: split and shadow stored on a
revision, the arm of each launch sticky per service (init, re-init, batch re-init, assignment
jobs, retry), the split ratio, shadow copies that never touch a service or fire anything, the
freeze check of each version, bad input, listjobs ``?arm=``, the arms route and the metrics."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from factories import assign, domain_url, init_service, make_version, tenant_setup
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

D = domain_url("client-1", "south_australia")
ROUTE = {"route": "Adelaide to Sydney"}
SPLIT_V2 = [{"model_id": "pricing-model", "model_version": "2", "percent": 30}]
SHADOW_V3 = [{"model_id": "pricing-model", "model_version": "3"}]


def bucket(assignment_id: str, service_id: str) -> int:
    """docs/experiments.md's Python, verbatim."""
    return int(hashlib.md5(f"{assignment_id}:{service_id}".encode()).hexdigest()[:8], 16) % 100


def expected_arm(revision: dict[str, Any], service_id: str) -> tuple[str, str]:
    """(arm, model_version) the docs say a service takes on a revision."""
    value, edge = bucket(revision["assignment_id"], service_id), 0
    for entry in revision["split"]:
        edge += entry["percent"]
        if value < edge:
            return "split", entry["model_version"]
    return "primary", revision["model_version"]


async def job(client, admin, job_id: str) -> dict[str, Any]:
    r = await client.get(f"/v2/jobs/{job_id}", headers=admin)
    assert r.status_code == 200, r.text
    return r.json()


async def shadows_of(client, admin, job_id: str) -> list[dict[str, Any]]:
    listed = (await client.get("/v2/jobs", params={"arm": "shadow", "limit": 1000}, headers=admin)).json()
    return [j for j in listed if j["shadow_of"] == job_id]


async def complete(client, admin, body: dict[str, Any], status: str = "success") -> dict[str, Any]:
    r = await client.post(
        f"/v2/models/{body['model_id']}/versions/{body['model_version']}/jobs/{body['job_id']}/complete",
        json={"status": status, "output": {"price": 1}} if status == "success" else {"status": status},
        headers=admin,
    )
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture
async def world(client, session, admin) -> None:
    """Client, domain, pricing-model versions 1 (default's primary), 2, 3 and 4, all active."""
    await tenant_setup(client, session, admin)
    for version in ("2", "3", "4"):
        await make_version(session, version=version)


async def counts(session) -> tuple[int, int]:
    assignments = await session.scalar(text("SELECT count(*) FROM assignments"))
    jobs = await session.scalar(text("SELECT count(*) FROM jobs"))
    await session.commit()
    return assignments, jobs


# -- the revision ---------------------------------------------------------------------------------


async def test_split_and_shadow_are_stored_answered_listed_and_ended(client, session, admin, world):
    body = {"split": SPLIT_V2, "shadow": SHADOW_V3}
    dry = await client.put(
        f"{D}/assignments/default?dry_run=true",
        json={"model_id": "pricing-model", "model_version": "1", **body},
        headers=admin,
    )
    assert dry.status_code == 200, dry.text
    assert dry.json()["revision"]["split"] == SPLIT_V2 and dry.json()["revision"]["shadow"] == SHADOW_V3
    revision = (await assign(client, admin, **body)).json()
    assert revision["split"] == SPLIT_V2 and revision["shadow"] == SHADOW_V3
    got = (await client.get(f"{D}/assignments/default", headers=admin)).json()
    assert got == revision
    # ending the experiment: the key written again without split (and shadow)
    ended = (await assign(client, admin)).json()
    assert ended["split"] == [] and ended["shadow"] == []
    history = (await client.get(f"{D}/assignments/default/revisions", headers=admin)).json()
    assert [(r["split"], r["shadow"]) for r in history] == [([], []), (SPLIT_V2, SHADOW_V3), ([], [])]
    # a service-scope key takes an experiment too
    await init_service(client, admin, "svc-1", ROUTE)
    r = await assign(client, admin, key="forecast", service_id="svc-1", split=SPLIT_V2)
    assert r.json()["split"] == SPLIT_V2


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"split": [{"model_id": "pricing-model", "model_version": "2", "percent": 0}]}, "from 1 to 99"),
        ({"split": [{"model_id": "pricing-model", "model_version": "2", "percent": 100}]}, "from 1 to 99"),
        (
            {
                "split": [
                    {"model_id": "pricing-model", "model_version": "2", "percent": 60},
                    {"model_id": "pricing-model", "model_version": "3", "percent": 40},
                ]
            },
            "sum to 100",
        ),
        ({"split": [{"model_id": "pricing-model", "model_version": "1", "percent": 10}]}, "named twice"),
        ({"shadow": [{"model_id": "pricing-model", "model_version": "1"}]}, "named twice"),
        (
            {
                "split": [{"model_id": "pricing-model", "model_version": "2", "percent": 10}],
                "shadow": [{"model_id": "pricing-model", "model_version": "2"}],
            },
            "named twice",
        ),
        ({"shadow": [{"model_id": "pricing-model", "model_version": "3"}] * 2}, "named twice"),
        ({"split": [{"model_id": "pricing-model", "model_version": "archived", "percent": 10}]}, "is archived"),
        ({"shadow": [{"model_id": "pricing-model", "model_version": "failed"}]}, "has failed"),
        ({"shadow": [{"model_id": "pricing-model", "model_version": "nope"}]}, "does not exist"),
    ],
)
@pytest.mark.parametrize("scope", ["domain", "service"])
async def test_bad_experiments_are_422_and_write_nothing(client, session, admin, world, extra, message, scope):
    await make_version(session, version="archived", status="archived")
    await make_version(session, version="failed", status="failed")
    await init_service(client, admin, "svc-1", ROUTE)
    before = await counts(session)
    base = D if scope == "domain" else f"{D}/service/svc-1"
    for suffix in ("", "?dry_run=true") if scope == "domain" else ("",):
        r = await client.put(
            f"{base}/assignments/default{suffix}",
            json={"model_id": "pricing-model", "model_version": "1", **extra},
            headers=admin,
        )
        assert r.status_code == 422, r.text
        assert r.json()["success"] is False and message in r.json()["message"], r.text
    assert await counts(session) == before


async def test_a_percent_that_is_not_an_integer_is_a_400(client, admin, world):
    r = await client.put(
        f"{D}/assignments/default",
        json={"model_id": "pricing-model", "model_version": "1", "split": [{**SPLIT_V2[0], "percent": 12.5}]},
        headers=admin,
    )
    assert r.status_code == 400 and "percent" in r.json()["message"]


async def test_the_freeze_check_names_the_blocking_split_version(client, session, admin, world):
    # version 5 froze a schema where only one route exists: svc-1 (the other route) fails it
    narrow = [{"name": "route", "json_schema": {"type": "string", "enum": ["Sydney to Adelaide"]}, "mandatory": True}]
    await make_version(session, version="5", features=narrow)
    await init_service(client, admin, "svc-1", ROUTE)
    before = await counts(session)
    for suffix in ("", "?dry_run=true"):
        r = await client.put(
            f"{D}/assignments/default{suffix}",
            json={
                "model_id": "pricing-model",
                "model_version": "1",
                "split": [{"model_id": "pricing-model", "model_version": "5", "percent": 10}],
                "shadow": SHADOW_V3,
            },
            headers=admin,
        )
        assert r.status_code == 422, r.text
        body = r.json()
        assert "split model pricing-model version 5" in body["error"]
        assert body["blocking_services"] == [
            {
                "service_id": "svc-1",
                "feature": "route",
                "value": "Adelaide to Sydney",
                "reason": body["blocking_services"][0]["reason"],
                "model_id": "pricing-model",
                "model_version": "5",
            }
        ]
    assert await counts(session) == before
    # as a shadow it blocks as well
    r = await client.put(
        f"{D}/assignments/default",
        json={
            "model_id": "pricing-model",
            "model_version": "1",
            "shadow": [{"model_id": "pricing-model", "model_version": "5"}],
        },
        headers=admin,
    )
    assert r.status_code == 422 and r.json()["blocking_services"][0]["model_version"] == "5"


async def test_a_version_in_an_experiment_cannot_be_archived(client, admin, world):
    await assign(client, admin, split=SPLIT_V2, shadow=SHADOW_V3)
    for version in ("2", "3"):
        r = await client.post(
            f"/v2/models/pricing-model/versions/{version}/new_status", json={"status": "archived"}, headers=admin
        )
        assert r.status_code == 409, r.text
        assert r.json()["assignments"][0]["assignment_key"] == "default"
    await assign(client, admin)  # the experiment ended: now it can
    r = await client.post("/v2/models/pricing-model/versions/2/new_status", json={"status": "archived"}, headers=admin)
    assert r.status_code == 200, r.text


# -- the arm of a launch ----------------------------------------------------------------------------


async def test_a_service_stays_on_its_arm_over_init_reinit_batch_jobs_and_retry(client, session, admin, world):
    split = [{"model_id": "pricing-model", "model_version": "2", "percent": 50}]
    revision = (await assign(client, admin, split=split)).json()
    services = [f"svc-{i}" for i in range(24)]
    arms: dict[str, tuple[str, str]] = {}
    for service_id in services:
        r = await init_service(client, admin, service_id, ROUTE)
        body = await job(client, admin, r.json()["job_id"])
        arms[service_id] = (body["arm"], body["model_version"])
        assert arms[service_id] == expected_arm(revision, service_id), service_id
        assert body["shadow_of"] is None and body["assignment_id"] == revision["assignment_id"]
    assert {arm for arm, _ in arms.values()} == {"primary", "split"}  # 24 services: both arms taken

    # re-init of one service, then its retry: the same arm each time
    for service_id in services[:6]:
        r = await client.post(f"{D}/service/{service_id}/init", headers=admin)
        assert r.status_code == 202, r.text
        reinit = await job(client, admin, r.json()["job_id"])
        assert (reinit["arm"], reinit["model_version"]) == arms[service_id]
        await complete(client, admin, reinit, "failure")
        r = await client.post(f"/v2/jobs/{reinit['job_id']}/retry", headers=admin)
        assert r.status_code == 202, r.text
        retried = await job(client, admin, r.json()["job_id"])
        assert (retried["arm"], retried["model_version"]) == arms[service_id]
        assert retried["retry_of"] == reinit["job_id"]

    # batch re-init: computed in SQL, the same arms
    r = await client.post(f"{D}/services/init", headers=admin)
    assert r.status_code == 202, r.text
    for entry in r.json()["jobs"]:
        body = await job(client, admin, entry["job_id"])
        assert (body["arm"], body["model_version"]) == arms[entry["service_id"]], entry

    # assignment jobs through a service-scope key with a split: sticky per (revision, service)
    for service_id in services[:8]:
        forecast = (await assign(client, admin, key="forecast", service_id=service_id, split=split)).json()
        want = expected_arm(forecast, service_id)
        for _ in range(3):
            r = await client.post(f"{D}/service/{service_id}/assignments/forecast/jobs", json={}, headers=admin)
            assert r.status_code == 202, r.text
            body = await job(client, admin, r.json()["job_id"])
            assert (body["arm"], body["model_version"]) == want


async def test_launches_without_a_service_pick_an_arm_at_random_by_weight(client, admin, world):
    await assign(
        client, admin, key="forecast", split=[{"model_id": "pricing-model", "model_version": "2", "percent": 50}]
    )
    seen = []
    for _ in range(60):
        r = await client.post(f"{D}/assignments/forecast/jobs", json={}, headers=admin)
        assert r.status_code == 202, r.text
        seen.append((await job(client, admin, r.json()["job_id"]))["arm"])
    # 60 fair draws: each arm at least 10 times (a false alarm has odds below 1e-6)
    assert seen.count("split") >= 10 and seen.count("primary") >= 10


async def test_the_split_ratio_over_10000_services(client, session, admin, world):
    await session.execute(
        text(
            """INSERT INTO services (client_id, domain_id, service_id, status, provided_features, resolved_features)
               SELECT 'client-1', 'south_australia', 'sailing-' || g, 'available',
                      '{"route": "Adelaide to Sydney"}', '{"route": "Adelaide to Sydney"}'
               FROM generate_series(1, 10000) AS g"""
        )
    )
    await session.commit()
    # fresh statistics, as autovacuum would have them (without, the planner takes the 10,000
    # new rows for a handful and the re-init's UPDATE ... FROM turns quadratic: ~25 s)
    await session.execute(text("ANALYZE services"))
    await session.commit()
    split = [
        {"model_id": "pricing-model", "model_version": "2", "percent": 20},
        {"model_id": "pricing-model", "model_version": "4", "percent": 5},
    ]
    revision = (await assign(client, admin, split=split, shadow=SHADOW_V3)).json()
    r = await client.post(f"{D}/services/init", headers=admin)
    assert r.status_code == 202, r.text
    assert len(r.json()["jobs"]) == 10000
    rows = (
        await session.execute(
            text("SELECT service_id, arm, model_version, job_id, shadow_of FROM jobs ORDER BY job_id")
        )
    ).all()
    launched = [row for row in rows if row.arm != "shadow"]
    assert len(launched) == 10000
    share = {arm: sum(1 for row in launched if row.model_version == v) / 10000 for arm, v in (("v2", "2"), ("v4", "4"))}
    assert abs(share["v2"] - 0.20) <= 0.02 and abs(share["v4"] - 0.05) <= 0.02, share
    # the statement's SQL hash is the documented Python one, service by service
    for row in launched:
        assert (row.arm, row.model_version) == expected_arm(revision, row.service_id), row
    # one shadow copy per launched job, on version 3, of that job
    copies = [row for row in rows if row.arm == "shadow"]
    assert len(copies) == 10000 and {row.model_version for row in copies} == {"3"}
    assert sorted(row.shadow_of for row in copies) == sorted(row.job_id for row in launched)
    # the documented SQL gives the same buckets
    mismatched = await session.scalar(
        text(
            """SELECT count(*) FROM jobs j
               WHERE j.arm = 'split' AND j.model_version = '2'
                 AND ('x' || substr(md5(j.assignment_id::text || ':' || j.service_id), 1, 8))::bit(32)::bigint % 100 >= 20"""
        )
    )
    assert mismatched == 0


# -- shadows ----------------------------------------------------------------------------------------


async def test_shadow_copies_never_touch_the_service_nor_fire_anything(
    client, session, admin, world, settings, monkeypatch
):
    monkeypatch.setattr(settings, "webhooks_allow_http", True)
    monkeypatch.setattr(settings, "webhooks_allow_private", True)
    r = await client.post(
        "/v2/clients/client-1/webhooks",
        json={
            "url": "http://127.0.0.1:9/hook",
            "events": ["job.succeeded", "job.failed", "service.available", "service.failed"],
        },
        headers=admin,
    )
    assert r.status_code == 201, r.text
    r = await client.post(
        "/v2/models/pricing-model/event-subscriptions",
        json={
            "trigger_event": "inference_complete",
            "target_model_id": "pricing-model",
            "target_action": "training",
            "input_source": "stored",
            "input": {},
        },
        headers=admin,
    )
    assert r.status_code == 201, r.text
    revision = (
        await assign(client, admin, shadow=SHADOW_V3 + [{"model_id": "pricing-model", "model_version": "4"}])
    ).json()

    init = (await init_service(client, admin, "svc-1", ROUTE)).json()
    primary = await job(client, admin, init["job_id"])
    assert primary["arm"] == "primary" and primary["shadow_of"] is None
    copies = await shadows_of(client, admin, primary["job_id"])
    assert sorted(c["model_version"] for c in copies) == ["3", "4"]
    for copy in copies:
        assert copy["arm"] == "shadow" and copy["assignment_id"] == revision["assignment_id"]
        assert (copy["input"], copy["client_id"], copy["domain_id"], copy["service_id"]) == (
            primary["input"],
            "client-1",
            "south_australia",
            "svc-1",
        )

    # the shadows end (one succeeds, one fails): the service stays initializing, nothing fires
    done = await complete(client, admin, copies[0], "success")
    assert done["triggered_events"] == []
    await complete(client, admin, copies[1], "failure")
    service = (await client.get(f"{D}/service/svc-1", headers=admin)).json()
    assert service["status"] == "initializing"
    events = await session.scalar(text("SELECT count(*) FROM webhook_events"))
    fired = await session.scalar(text("SELECT count(*) FROM jobs WHERE subscription_id IS NOT NULL"))
    await session.commit()
    assert (events, fired) == (0, 0)

    # a cancelled or retried shadow does not touch it either
    second = (await init_service(client, admin, "svc-2", ROUTE)).json()
    shadow = (await shadows_of(client, admin, second["job_id"]))[0]
    assert (await client.post(f"/v2/jobs/{shadow['job_id']}/cancel", headers=admin)).status_code == 200
    r = await client.post(f"/v2/jobs/{shadow['job_id']}/retry", headers=admin)
    assert r.status_code == 202, r.text
    again = await job(client, admin, r.json()["job_id"])
    assert again["arm"] == "shadow" and again["shadow_of"] == second["job_id"]
    assert again["model_version"] == shadow["model_version"] and again["retry_of"] == shadow["job_id"]
    assert (await client.get(f"{D}/service/svc-2", headers=admin)).json()["status"] == "initializing"

    # the primary's end is the one that sets the service and fires
    done = await complete(client, admin, primary, "success")
    assert len(done["triggered_events"]) == 1
    assert (await client.get(f"{D}/service/svc-1", headers=admin)).json()["status"] == "available"
    types = sorted((await session.execute(text("SELECT type FROM webhook_events"))).scalars().all())
    assert types == ["job.succeeded", "service.available"]


# -- reading an experiment --------------------------------------------------------------------------


def arm_samples(body: str) -> dict[str, float]:
    return {
        sample.labels["arm"]: sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
        if sample.name == "pie_jobs_arm_created_total"
    }


async def test_listjobs_arms_route_and_metrics_count_jobs_per_arm(client, session, admin, world):
    before = arm_samples((await client.get("/metrics")).text)
    revision = (await assign(client, admin, split=[{**SPLIT_V2[0], "percent": 50}], shadow=SHADOW_V3)).json()
    for i in range(10):
        await init_service(client, admin, f"svc-{i}", ROUTE)
    # a direct inference job is not launched through a key: no arm
    r = await client.post(
        "/v2/models/pricing-model/versions/1/inference", json={"input": ROUTE, "client_id": "client-1"}, headers=admin
    )
    assert r.status_code == 202, r.text
    direct = r.json()["inference_job_id"]

    listed = {
        arm: (await client.get("/v2/jobs", params={"arm": arm}, headers=admin)).json()
        for arm in ("primary", "split", "shadow")
    }
    assert {j["arm"] for j in listed["primary"]} == {"primary"} and {j["arm"] for j in listed["split"]} == {"split"}
    assert len(listed["primary"]) + len(listed["split"]) == 10 and len(listed["shadow"]) == 10
    expected_split = sum(1 for i in range(10) if expected_arm(revision, f"svc-{i}")[0] == "split")
    assert len(listed["split"]) == expected_split
    assert (await job(client, admin, direct))["arm"] is None
    assert (await client.get("/v2/jobs", params={"arm": "other"}, headers=admin)).status_code == 400

    # one split job succeeds, one primary job fails
    await complete(client, admin, listed["primary"][0], "failure")
    if listed["split"]:
        await complete(client, admin, listed["split"][0], "success")
    r = await client.get(f"{D}/assignments/default/arms", headers=admin)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["assignment_id"] == revision["assignment_id"] and body["assignment_key"] == "default"
    by_arm = {a["arm"]: a for a in body["arms"]}
    assert by_arm["primary"] == {
        "arm": "primary",
        "model_id": "pricing-model",
        "model_version": "1",
        "percent": 50,
        "jobs": 10 - expected_split,
        "pending": 10 - expected_split - 1,
        "started": 0,
        "success": 0,
        "failure": 1,
    }
    assert by_arm["split"]["model_version"] == "2" and by_arm["split"]["percent"] == 50
    assert by_arm["split"]["jobs"] == expected_split and by_arm["split"]["success"] == (1 if expected_split else 0)
    assert by_arm["shadow"]["percent"] is None and by_arm["shadow"]["jobs"] == 10
    # the service scope has the route too; 404 without an active revision
    r = await client.get(f"{D}/service/svc-1/assignments/forecast/arms", headers=admin)
    assert r.status_code == 404
    await assign(client, admin, key="forecast", service_id="svc-1", shadow=SHADOW_V3)
    r = await client.get(f"{D}/service/svc-1/assignments/forecast/arms", headers=admin)
    assert r.status_code == 200 and [a["arm"] for a in r.json()["arms"]] == ["primary", "shadow"]

    after = arm_samples((await client.get("/metrics")).text)
    assert after["shadow"] - before.get("shadow", 0) == 10
    assert after["primary"] + after["split"] - before.get("primary", 0) - before.get("split", 0) == 10
