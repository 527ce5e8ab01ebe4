"""The freeze check of domain assignment upserts (spec 6.2, 6.3) and its serialization against
concurrent service init/update."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

from factories import (
    SEVEN_FEATURES,
    assign,
    feature,
    fresh,
    init_service,
    jobs_of,
    make_version,
    stored_job,
    stored_service,
    tenant_setup,
)
from sqlalchemy import select

from pie.tables.assignments import Assignment
from pie.tables.tenancy import Service

D = "/v2/clients/client-1/domains/south_australia"
SA = {"route": "Adelaide to Sydney"}

# version 2's frozen contract: a new mandatory `cabin`, `fare` gets a default, `market_ref` is dropped
V2_FEATURES = [
    feature("route", {"type": "string", "enum": ["Adelaide to Sydney", "Sydney to Adelaide"]}, True),
    feature("cabin", {"type": "string", "enum": ["deck", "suite"]}, True),
    feature("competitor_count", {"type": "integer", "minimum": 0, "maximum": 10}),
    feature("fare", {"type": "number", "default": 99.5}),
]

# the live set in these tests: the seven example features plus a free-form `cabin`
LIVE = [dict(d) for d in SEVEN_FEATURES] + [feature("cabin", {"type": "string"})]


def past() -> str:
    return (datetime.now(timezone.utc) - timedelta(hours=2)).isoformat()


async def snapshot(session) -> dict:
    services = await fresh(session, select(Service).order_by(Service.service_id))
    assignments = await fresh(session, select(Assignment).order_by(Assignment.created_at))
    return {
        "services": [(s.service_id, s.provided_features, s.resolved_features, s.updated_at) for s in services],
        "assignments": [
            (a.assignment_id, a.assignment_key, a.model_version, a.status, a.updated_at) for a in assignments
        ],
    }


async def test_blocked_upsert_writes_nothing(client, session, admin):
    await tenant_setup(client, session, admin, features=LIVE)
    await init_service(client, admin, "svc-a", {"route": "Adelaide to Sydney", "competitor_count": 15, "market_ref": 3})
    await init_service(client, admin, "svc-b", {"route": "Sydney to Adelaide", "cabin": "suite"})
    await init_service(client, admin, "svc-c", {"route": "Sydney to Adelaide", "cabin": "cave"})
    await make_version(session, version="2", features=V2_FEATURES)
    features_before = (await client.get(f"{D}/features", headers=admin)).json()
    before = await snapshot(session)
    jobs_before = len(await jobs_of(session))

    r = await assign(client, admin, model_version="2", expect=422)
    body = r.json()
    assert set(body) == {"error", "blocking_services"}
    assert (
        body["error"] == "cannot assign model pricing-model version 2: 2 service(s) have incompatible provided_features"
    )
    entries = [(b["service_id"], b["feature"], b["value"]) for b in body["blocking_services"]]
    assert entries == [
        ("svc-a", "cabin", None),  # mandatory and missing: value null
        ("svc-a", "competitor_count", 15),  # the stored value; market_ref (dropped by v2) is ignored
        ("svc-c", "cabin", "cave"),
    ]
    assert all(isinstance(b["reason"], str) and b["reason"] for b in body["blocking_services"])
    assert body["blocking_services"][0]["reason"] == "missing mandatory feature"

    assert await snapshot(session) == before
    assert (await client.get(f"{D}/features", headers=admin)).json() == features_before
    assert len(await jobs_of(session)) == jobs_before
    r = await client.get(f"{D}/assignments/default", headers=admin)
    assert r.json()["model_version"] == "1"

    # with service_updates for only one of the blockers it is still blocked, still nothing written
    r = await assign(
        client,
        admin,
        model_version="2",
        service_updates=[{"service_id": "svc-c", "static_features": {"cabin": "deck"}}],
        expect=422,
    )
    assert [b["service_id"] for b in r.json()["blocking_services"]] == ["svc-a", "svc-a"]
    assert await snapshot(session) == before


async def test_service_updates_fixing_the_only_blocker_make_the_request_succeed(client, session, admin):
    await tenant_setup(client, session, admin)
    await init_service(client, admin, "svc-1", {"route": "Adelaide to Sydney", "market_ref": "spot"})
    await init_service(client, admin, "svc-2", {"route": "Sydney to Adelaide", "competitor_count": 2})
    await make_version(session, version="2", features=V2_FEATURES)
    request = {"model_id": "pricing-model", "model_version": "2"}

    # both miss `cabin`: fix svc-2 only -> still blocked by svc-1
    r = await client.put(
        f"{D}/assignments/default",
        json={**request, "service_updates": [{"service_id": "svc-2", "static_features": {"cabin": "suite"}}]},
        headers=admin,
    )
    assert r.status_code == 422 and [b["service_id"] for b in r.json()["blocking_services"]] == ["svc-1"]

    # the same request patching both passes, in one transaction
    updates = [
        {"service_id": "svc-1", "static_features": {"cabin": "deck", "market_ref": None}},
        {"service_id": "svc-2", "static_features": {"cabin": "suite"}},
    ]
    r = await client.put(f"{D}/assignments/default", json={**request, "service_updates": updates}, headers=admin)
    assert r.status_code == 200, r.text
    assert r.json()["model_version"] == "2" and r.json()["status"] == "active"

    s1, s2 = await stored_service(session, "svc-1"), await stored_service(session, "svc-2")
    assert s1.provided_features == {"route": "Adelaide to Sydney", "cabin": "deck"}
    assert s1.resolved_features == {"route": "Adelaide to Sydney", "cabin": "deck", "fare": 99.5}
    assert s2.provided_features == {"route": "Sydney to Adelaide", "competitor_count": 2, "cabin": "suite"}
    assert s2.resolved_features == {
        "route": "Sydney to Adelaide",
        "cabin": "suite",
        "competitor_count": 2,
        "fare": 99.5,
    }
    history = (await client.get(f"{D}/assignments/default/revisions", headers=admin)).json()
    assert [(h["model_version"], h["status"]) for h in history] == [("2", "active"), ("1", "archived")]


async def test_unknown_keys_are_ignored_and_dropped_from_resolved(client, session, admin):
    await tenant_setup(client, session, admin)
    await init_service(client, admin, "s", {"route": "Adelaide to Sydney", "market_ref": "auction", "on_demand": True})
    narrower = [feature("route", {"type": "string"}, True)]
    await make_version(session, version="2", features=narrower)
    await assign(client, admin, model_version="2")
    service = await stored_service(session, "s")
    assert service.provided_features == {"route": "Adelaide to Sydney", "market_ref": "auction", "on_demand": True}
    assert service.resolved_features == {"route": "Adelaide to Sydney"}


async def test_service_updates_validation_errors_use_the_envelope(client, session, admin):
    await tenant_setup(client, session, admin)
    await init_service(client, admin, "live", SA)
    await init_service(client, admin, "gone", SA, departure_datetime=past())
    before = await snapshot(session)
    cases = [
        ([{"service_id": "ghost", "static_features": {}}], "ghost"),
        ([{"service_id": "gone", "static_features": {"competitor_count": 1}}], "departed"),
        (
            [{"service_id": "live", "static_features": {}}, {"service_id": "live", "static_features": {}}],
            "more than once",
        ),
    ]
    for updates, detail in cases:
        r = await assign(client, admin, service_updates=updates, expect=422)
        assert r.json()["success"] is False and detail in r.json()["message"], r.text
    assert await snapshot(session) == before


async def test_departed_services_never_block_and_are_not_re_resolved(client, session, admin):
    await tenant_setup(client, session, admin)
    await init_service(client, admin, "gone", {"route": "Adelaide to Sydney"}, departure_datetime=past())
    await init_service(client, admin, "live", {"route": "Adelaide to Sydney"})
    await make_version(session, version="2", features=V2_FEATURES)
    # `live` blocks; fixing it is enough even though `gone` would fail the same way
    r = await assign(client, admin, model_version="2", expect=422)
    assert [b["service_id"] for b in r.json()["blocking_services"]] == ["live"]
    gone_before = await stored_service(session, "gone")
    await assign(
        client, admin, model_version="2", service_updates=[{"service_id": "live", "static_features": {"cabin": "deck"}}]
    )
    gone = await stored_service(session, "gone")
    assert gone.resolved_features == gone_before.resolved_features == {"route": "Adelaide to Sydney"}
    assert gone.updated_at == gone_before.updated_at
    assert (await stored_service(session, "live")).resolved_features["fare"] == 99.5
    # batch re-init ignores it as well
    r = await client.post(f"{D}/services/init", headers=admin)
    assert r.json()["dispatched_services"] == ["live"]


async def test_default_upsert_re_resolves_every_non_departed_service(client, session, admin):
    await tenant_setup(client, session, admin)
    for index in range(6):
        await init_service(client, admin, f"s{index}", {"route": "Adelaide to Sydney", "competitor_count": index % 3})
    with_default = [dict(d) for d in SEVEN_FEATURES] + [feature("fare", {"type": "number", "default": 12})]
    await make_version(session, version="2", features=with_default)
    await assign(client, admin, model_version="2")
    for index in range(6):
        service = await stored_service(session, f"s{index}")
        assert service.resolved_features == {"route": "Adelaide to Sydney", "competitor_count": index % 3, "fare": 12}
        assert service.provided_features == {"route": "Adelaide to Sydney", "competitor_count": index % 3}
    # moving back to version 1 (no frozen schema): the live features govern again
    await assign(client, admin, model_version="1")
    assert (await stored_service(session, "s0")).resolved_features == {
        "route": "Adelaide to Sydney",
        "competitor_count": 0,
    }


async def test_non_default_domain_keys_are_checked_but_resolve_nothing(client, session, admin):
    await tenant_setup(client, session, admin)
    await init_service(client, admin, "s", SA)
    await make_version(session, version="2", features=V2_FEATURES)
    r = await assign(client, admin, key="forecast", model_version="2", expect=422)
    assert r.json()["blocking_services"][0]["service_id"] == "s"
    assert (await client.get(f"{D}/assignments/forecast", headers=admin)).status_code == 404
    # a compatible frozen schema passes and leaves resolved_features alone
    await make_version(
        session,
        version="3",
        features=[feature("route", {"type": "string"}, True), feature("x", {"type": "integer", "default": 1})],
    )
    before = await stored_service(session, "s")
    await assign(client, admin, key="forecast", model_version="3")
    after = await stored_service(session, "s")
    assert after.resolved_features == before.resolved_features and after.updated_at == before.updated_at
    # an archived upsert is not checked at all
    await assign(client, admin, key="forecast", model_version="2", status="archived")


async def test_target_without_frozen_schema_is_checked_against_live_features(client, session, admin):
    await tenant_setup(client, session, admin)
    await init_service(client, admin, "s", {"route": "Adelaide to Sydney", "competitor_count": 12})
    # live features tightened after the service was initialised (persist-only PUT)
    tightened = [
        feature("route", {"type": "string"}, True),
        feature("competitor_count", {"type": "integer", "maximum": 10}),
    ]
    await client.put(f"{D}/features", json={"features": tightened}, headers=admin)
    await make_version(session, version="2")
    r = await assign(client, admin, model_version="2", expect=422)
    assert r.json()["blocking_services"] == [
        {
            "service_id": "s",
            "feature": "competitor_count",
            "value": 12,
            "reason": r.json()["blocking_services"][0]["reason"],
        }
    ]
    assert "12" in r.json()["blocking_services"][0]["reason"]


async def test_jobs_keep_the_assignment_id_after_the_key_moves(client, session, admin):
    await tenant_setup(client, session, admin)
    await make_version(session, version="2")
    r = await init_service(client, admin, "s", SA)
    init_job_id = r.json()["job_id"]
    first = (await client.get(f"{D}/assignments/default", headers=admin)).json()
    r = await client.post(f"{D}/service/s/assignments/default/jobs", json={}, headers=admin)
    assert r.status_code == 404  # the service scope has no default key of its own
    r = await client.post(f"{D}/assignments/default/jobs", json={"input": {"n": 1}}, headers=admin)
    old_job_id = r.json()["job_id"]

    second = (await assign(client, admin, model_version="2")).json()
    r = await client.post(f"{D}/assignments/default/jobs", json={"input": {"n": 2}}, headers=admin)
    new_job_id = r.json()["job_id"]

    init_job, old_job, new_job = [await stored_job(session, j) for j in (init_job_id, old_job_id, new_job_id)]
    assert str(init_job.assignment_id) == first["assignment_id"] and init_job.model_version == "1"
    assert str(old_job.assignment_id) == first["assignment_id"] and old_job.model_version == "1"
    assert str(new_job.assignment_id) == second["assignment_id"] and new_job.model_version == "2"
    history = (await client.get(f"{D}/assignments/default/revisions", headers=admin)).json()
    assert history[1]["assignment_id"] == first["assignment_id"] and history[1]["status"] == "archived"


async def test_concurrent_init_and_default_upsert_never_let_a_service_slip_past(client, session, admin):
    """A service initialized while the default key moves to an incompatible version is either
    checked by the upsert (which is then blocked) or initialized under the new schema (which
    refuses it): never both accepted."""
    await tenant_setup(client, session, admin)
    await make_version(session, version="2", features=V2_FEATURES)
    outcomes = set()
    for round_ in range(8):
        service_id = f"race-{round_}"
        init_call = client.post(
            f"{D}/service/init", json={"service_id": service_id, "static_features": SA}, headers=admin
        )
        upsert_call = client.put(
            f"{D}/assignments/default", json={"model_id": "pricing-model", "model_version": "2"}, headers=admin
        )
        calls = [init_call, upsert_call] if round_ % 2 == 0 else [upsert_call, init_call]
        results = await asyncio.gather(*calls)
        init_r, upsert_r = results if round_ % 2 == 0 else results[::-1]
        assert {init_r.status_code, upsert_r.status_code} == {202, 422} or (
            init_r.status_code == 422 and upsert_r.status_code == 200
        ), (init_r.text, upsert_r.text)
        default = (await client.get(f"{D}/assignments/default", headers=admin)).json()
        service = await stored_service(session, service_id)
        if init_r.status_code == 202:
            # it was checked: the upsert was blocked by it
            assert upsert_r.status_code == 422
            assert service_id in {b["service_id"] for b in upsert_r.json()["blocking_services"]}
            assert default["model_version"] == "1"
            outcomes.add("checked")
        else:
            # initialized (attempted) under the new schema, which rejects it
            assert upsert_r.status_code == 200 and default["model_version"] == "2"
            assert "cabin" in init_r.json()["message"] and service is None
            outcomes.add("new schema")
        # reset for the next round: park the service and point default back at version 1
        if service is not None:
            await client.put(f"{D}/service/{service_id}", json={"departure_datetime": past()}, headers=admin)
        await assign(client, admin, model_version="1")


async def test_concurrent_init_and_compatible_default_upsert_resolves_under_the_final_schema(client, session, admin):
    """When both succeed, the service's resolved_features match the governing schema at the end."""
    await tenant_setup(client, session, admin)
    with_fare = [dict(d) for d in SEVEN_FEATURES] + [feature("fare", {"type": "number", "default": 7})]
    await make_version(session, version="2", features=with_fare)
    for round_ in range(6):
        target = "2" if round_ % 2 == 0 else "1"
        service_id = f"svc-{round_}"
        init_r, upsert_r = await asyncio.gather(
            client.post(f"{D}/service/init", json={"service_id": service_id, "static_features": SA}, headers=admin),
            client.put(
                f"{D}/assignments/default", json={"model_id": "pricing-model", "model_version": target}, headers=admin
            ),
        )
        assert init_r.status_code == 202 and upsert_r.status_code == 200, (init_r.text, upsert_r.text)
        expected = {**SA, "fare": 7} if target == "2" else SA
        for index in range(round_ + 1):
            assert (await stored_service(session, f"svc-{index}")).resolved_features == expected


async def test_concurrent_update_and_default_upsert(client, session, admin):
    """A service update racing a default upsert: either the update lands first (and the upsert
    checks the updated features) or after (and is resolved under the new schema)."""
    await tenant_setup(client, session, admin)
    await make_version(session, version="2", features=V2_FEATURES)
    for round_ in range(6):
        service_id = f"u{round_}"
        await init_service(client, admin, service_id, SA)
        update_r, upsert_r = await asyncio.gather(
            client.put(f"{D}/service/{service_id}", json={"static_features": {"competitor_count": 1}}, headers=admin),
            client.put(
                f"{D}/assignments/default",
                json={
                    "model_id": "pricing-model",
                    "model_version": "2",
                    "service_updates": [{"service_id": service_id, "static_features": {"cabin": "deck"}}],
                },
                headers=admin,
            ),
        )
        assert update_r.status_code == 200 and upsert_r.status_code == 200, (update_r.text, upsert_r.text)
        service = await stored_service(session, service_id)
        # whichever order: both patches are kept and the service resolves under version 2
        assert service.provided_features == {**SA, "competitor_count": 1, "cabin": "deck"}
        assert service.resolved_features == {**SA, "competitor_count": 1, "cabin": "deck", "fare": 99.5}
        await client.put(f"{D}/service/{service_id}", json={"departure_datetime": past()}, headers=admin)
        await assign(client, admin, model_version="1")


async def test_bulk_re_resolve_matches_the_resolver(client, session, admin):
    """The set-based re-resolve in SQL gives exactly what the feature resolver gives, service by
    service: provided values, defaults for absent features, unknown keys left out."""
    from pie.tenancy.features import resolve_features

    live = [
        feature("route", {"type": "string"}, True),
        feature("cabin", {"type": ["string", "null"]}),
        feature("legacy", {"type": "integer"}),
        feature("weekly", {"type": "array", "items": {"type": "number"}}),
        feature("pair", {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}], "items": False}),
    ]
    target = [
        feature("route", {"type": "string"}, True),
        feature("cabin", {"type": ["string", "null"], "default": "deck"}),
        feature("weekly", {"type": "array", "items": {"type": "number"}, "default": [0, 0]}),
        feature("pair", {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}], "items": False}),
        feature("fare", {"type": "number", "default": 1.5}),
        feature("flag", {"type": "boolean"}),
    ]
    await tenant_setup(client, session, admin, features=live)
    provided_sets = [
        {"route": "a"},
        {"route": "b", "cabin": "suite", "legacy": 3},
        {"route": "c", "cabin": None, "weekly": [1.5, 2, 3e10]},
        {"route": "d", "pair": ["x", 7], "legacy": 0, "weekly": []},
        {"route": "e", "cabin": "ünïcode ✓", "pair": ["y", -1]},
    ]
    for index, provided in enumerate(provided_sets):
        await init_service(client, admin, f"s{index}", provided)
    await init_service(client, admin, "gone", {"route": "z", "legacy": 1}, departure_datetime=past())
    await make_version(session, version="2", features=target)
    await assign(client, admin, model_version="2")
    for index, provided in enumerate(provided_sets):
        expected, failures = resolve_features(provided, target, unknown="ignore")
        assert failures == []
        service = await stored_service(session, f"s{index}")
        assert service.resolved_features == expected, (provided, service.resolved_features)
        assert service.provided_features == provided
    assert (await stored_service(session, "gone")).resolved_features == {"route": "z", "legacy": 1}


async def test_an_invalid_default_in_a_frozen_schema_blocks_services_that_need_it(client, session, admin):
    """Frozen schemas are validated when created; one written around that (directly in the
    database) still cannot slip an invalid default into resolved_features."""
    await tenant_setup(client, session, admin, features=[feature("route", {"type": "string"}, True)])
    await init_service(client, admin, "has-fare", {"route": "a"})
    await make_version(
        session,
        version="2",
        features=[feature("route", {"type": "string"}, True), feature("fare", {"type": "number", "default": "free"})],
    )
    r = await assign(client, admin, model_version="2", expect=422)
    (entry,) = r.json()["blocking_services"]
    assert (entry["service_id"], entry["feature"], entry["value"]) == ("has-fare", "fare", "free")


async def test_blocking_entries_for_many_services_and_null_values(client, session, admin):
    live = [feature("route", {"type": "string"}, True), feature("cabin", {"type": ["string", "null"]})]
    await tenant_setup(client, session, admin, features=live)
    for index in range(12):
        cabin = None if index % 3 == 0 else ("deck" if index % 3 == 1 else "cave")
        await init_service(client, admin, f"s{index:02d}", {"route": "r", "cabin": cabin})
    await make_version(
        session,
        version="2",
        features=[
            feature("route", {"type": "string"}, True),
            feature("cabin", {"type": "string", "enum": ["deck", "suite"]}),
        ],
    )
    r = await assign(client, admin, model_version="2", expect=422)
    body = r.json()
    expected = [(f"s{i:02d}", None if i % 3 == 0 else "cave") for i in range(12) if i % 3 != 1]
    assert [(b["service_id"], b["value"]) for b in body["blocking_services"]] == expected
    assert all(b["feature"] == "cabin" for b in body["blocking_services"])
    assert body["error"].endswith(f"{len(expected)} service(s) have incompatible provided_features")
