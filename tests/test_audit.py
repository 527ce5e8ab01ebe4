"""The audit trail (spec 14.6): one audit row per write with its actor, nothing for a failed or
refused write, created_by on written records, the version status history, tenant filtering of
``GET /v2/audit``; and the freeze-check dry run (spec 14.7)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from factories import assign, create_domain, init_service, make_client, make_version, tenant_setup
from fastapi import FastAPI
from sqlalchemy import func, select, text
from sqlalchemy.exc import DBAPIError
from test_access_matrix import BODIES, DOMAIN, A, World, call, operations, world  # noqa: F401 (fixture)
from test_assignments_freeze import LIVE, V2_FEATURES

from pie.models_all import Base
from pie.tables.audit import AuditRecord

D = "/v2/clients/client-1/domains/south_australia"
ADMIN_ACTOR = {"sub": "pie-dev-user", "username": None, "client_id": None}


async def audit_rows(session) -> list[AuditRecord]:
    session.expire_all()
    return list((await session.scalars(select(AuditRecord).order_by(AuditRecord.id))).all())


async def table_counts(session) -> dict[str, int]:
    counts = {}
    for table in Base.metadata.sorted_tables:
        counts[table.name] = (await session.execute(select(func.count()).select_from(table))).scalar_one()
    await session.rollback()
    return counts


# ---- one row per write ----------------------------------------------------------------------


async def test_every_write_operation_records_exactly_one_audit_row(app, client, session, admin, world: World):
    """Walks every non-GET operation of the OpenAPI document: each succeeds and leaves exactly
    one row naming its operation id, the actor, the request id and a target."""
    writes = [op for op in operations(app) if op.method != "GET"]
    assert len(writes) >= 23
    writes.sort(key=lambda op: op.method == "DELETE")  # the subscription is deleted last
    for op in writes:
        override = {}
        if op.op_id == "canceljob":  # a pending job of its own (completemodeljob ends the world's job)
            r = await client.post("/v2/models/pricing-model/versions/1/inference", json={"input": {}}, headers=admin)
            override["job_id"] = r.json()["inference_job_id"]
        before = await audit_rows(session)
        request_id = f"req-{op.op_id}"
        r = await call(client, op, world, {**admin, "X-Request-ID": request_id}, **override)
        assert r.status_code < 300, f"{op.op_id}: {r.status_code} {r.text[:200]}"
        after = await audit_rows(session)
        assert len(after) == len(before) + 1, f"{op.op_id}: {len(after) - len(before)} audit rows"
        row = after[-1]
        assert row.action == op.op_id
        assert row.method == op.method
        assert row.request_id == request_id
        assert row.actor == ADMIN_ACTOR
        assert row.target_type and row.target_id, f"{op.op_id}: target {row.target_type}/{row.target_id}"
        if op.tenant_route:
            assert row.client_id == A


async def test_the_audit_row_names_the_target_and_what_changed(client, session, admin):
    await tenant_setup(client, session, admin)
    await make_version(session, version="7")
    r = await assign(client, admin, model_version="7")
    row = (await audit_rows(session))[-1]
    assert (row.action, row.target_type, row.target_id, row.client_id) == (
        "putdomainmodelassignment",
        "assignment",
        "south_australia/default",
        "client-1",
    )
    assert row.summary["model_version"] == "7"
    assert row.summary["assignment_id"] == r.json()["assignment_id"]
    # generated ids are recorded: a model created without an id
    r = await client.post(
        "/v2/models",
        json={"name": "m", "description": "d", "handlers": BODIES["createmodel"]["handlers"]},
        headers=admin,
    )
    assert r.status_code == 201, r.text
    row = (await audit_rows(session))[-1]
    assert (row.target_type, row.target_id, row.client_id) == ("model", r.json()["id"], None)
    assert row.summary["fields"] == ["handlers"]


async def test_refused_and_failed_writes_leave_no_audit_row(client, session, admin, auth):
    await tenant_setup(client, session, admin, features=LIVE)
    await init_service(client, admin, "svc-a", {"route": "Adelaide to Sydney", "competitor_count": 15})
    await make_version(session, version="2", features=V2_FEATURES)
    rows = len(await audit_rows(session))
    await assign(client, admin, model_version="2", expect=422)  # blocked by the freeze check
    assert (
        await client.post(
            f"{D}/assignments?dry_run=true",
            json={"assignment_key": "x", "model_id": "pricing-model", "model_version": "1"},
            headers=admin,
        )
    ).status_code == 200
    assert (
        await client.post("/v2/clients/client-1/domains", json={"domain_id": DOMAIN_ID}, headers=admin)
    ).status_code == 409
    r = await client.post("/v2/models/pricing-model/versions/1/new_status", json={"status": "pending"}, headers=admin)
    assert r.status_code == 422  # active -> pending is not a transition
    r = await client.post(
        f"{D}/service/init", json={"service_id": "svc-x"}, headers=auth(scopes=["read_domains"], client_id="client-1")
    )
    assert r.status_code == 403
    assert len(await audit_rows(session)) == rows


DOMAIN_ID = "south_australia"


async def test_the_audit_row_and_the_write_commit_together(client, session, admin, monkeypatch):
    """Same transaction: when the audit insert fails, the write is rolled back with it."""
    await make_client(session, "client-1")
    counts = await table_counts(session)

    async def broken(*args: Any, **kwargs: Any) -> None:
        await args[0].execute(text("SELECT 1/0"))

    monkeypatch.setattr("pie.audit.routing.record", broken)
    r = await client.post("/v2/clients/client-1/domains", json={"domain_id": "d1", "features": []}, headers=admin)
    assert r.status_code == 500
    assert await table_counts(session) == counts


async def test_the_audit_log_is_append_only(client, session, admin):
    await tenant_setup(client, session, admin)
    assert await audit_rows(session)
    for statement in ("UPDATE audit_log SET action = 'x'", "DELETE FROM audit_log"):
        with pytest.raises(DBAPIError, match="append-only"):
            await session.execute(text(statement))
        await session.rollback()
    assert all(row.action != "x" for row in await audit_rows(session))


def test_an_unaudited_write_route_refuses_to_start():
    from pie.audit.routing import check_routes

    app = FastAPI()

    @app.post("/v2/sneaky", operation_id="sneaky")
    async def sneaky() -> None:  # pragma: no cover - never served
        return None

    with pytest.raises(RuntimeError, match="not audited"):
        check_routes(app)


def test_the_start_up_checks_see_the_routes_of_included_routers():
    """The app includes routers (kept as one entry each by FastAPI): a plain write route or a
    route without the bounded parser inside one must still stop the app from starting."""
    from fastapi import APIRouter

    from pie.audit.routing import check_routes
    from pie.http.routing import routes_without_pie_route

    router = APIRouter()

    @router.post("/v2/sneaky", operation_id="sneaky")
    async def sneaky() -> None:  # pragma: no cover - never served
        return None

    app = FastAPI()
    app.include_router(router)
    with pytest.raises(RuntimeError, match="not audited"):
        check_routes(app)
    assert routes_without_pie_route(app.routes) == ["['POST'] /v2/sneaky"]


# ---- actors and created_by ------------------------------------------------------------------


async def test_actor_of_humans_and_machines_on_rows_and_records(client, session, admin, auth):
    await make_client(session, "client-1")
    await make_version(session)
    human = auth(subject="u-123", username="alice", groups=["client:client-1"])
    machine = auth(subject="app-9", scopes=["manage_domains", "init_services", "run_inference"], client_id="client-1")

    r = await client.post("/v2/clients/client-1/domains", json={"domain_id": DOMAIN_ID, "features": []}, headers=human)
    assert r.status_code == 201, r.text
    alice = {"sub": "u-123", "username": "alice", "client_id": None}
    assert r.json()["created_by"] == alice
    r = await client.put(
        f"{D}/assignments/default", json={"model_id": "pricing-model", "model_version": "1"}, headers=machine
    )
    assert r.status_code == 200, r.text
    robot = {"sub": "app-9", "username": None, "client_id": "client-1"}
    assert r.json()["created_by"] == robot
    r = await init_service(client, machine, "svc-1", {})
    job_id = r.json()["job_id"]
    service = (await client.get(f"{D}/service/svc-1", headers=admin)).json()
    assert service["created_by"] == robot
    assert (await client.get(f"/v2/jobs/{job_id}", headers=admin)).json()["created_by"] == robot

    actors = [(row.action, row.actor) for row in await audit_rows(session)]
    assert actors == [
        ("createdomain", alice),
        ("putdomainmodelassignment", robot),
        ("initdomainservice", robot),
    ]
    # the revision list shows who made each revision
    revisions = (await client.get(f"{D}/assignments/default/revisions", headers=admin)).json()
    assert [rev["created_by"] for rev in revisions] == [robot]


async def test_jobs_fired_by_a_write_carry_its_actor(client, session, admin, auth):
    await make_version(session, status="training")
    r = await client.post(
        "/v2/models/pricing-model/event-subscriptions",
        json={
            "trigger_event": "training_complete",
            "target_model_id": "pricing-model",
            "target_action": "inference",
            "input_source": "stored",
            "input": {"x": 1},
        },
        headers=admin,
    )
    assert r.status_code == 201 and r.json()["created_by"] == ADMIN_ACTOR
    carol = auth(subject="u-carol", username="carol", scopes=["manage_models", "read_models"])
    r = await client.post("/v2/models/pricing-model/versions/1/new_status", json={"status": "active"}, headers=carol)
    assert r.status_code == 200, r.text
    [event] = r.json()["triggered_events"]
    job = (await client.get(f"/v2/jobs/{event['job_id']}", headers=admin)).json()
    assert job["created_by"] == {"sub": "u-carol", "username": "carol", "client_id": None}


# ---- version status history -----------------------------------------------------------------


async def test_version_status_history_shows_each_transition(client, session, admin, auth):
    await make_version(session)  # model and version 1
    dave = auth(subject="u-dave", username="dave", scopes=["manage_models", "read_models"])
    erin = auth(subject="u-erin", username="erin", scopes=["manage_models", "read_models"])
    r = await client.post("/v2/models/pricing-model/new_version", json={}, headers=dave)
    assert r.status_code == 201, r.text
    version = r.json()["version"]
    assert version["created_by"] == {"sub": "u-dave", "username": "dave", "client_id": None}
    url = f"/v2/models/pricing-model/versions/{version['version']}"
    assert (await client.get(f"{url}/status-history", headers=dave)).json() == []

    for who, status in (
        (dave, "training"),
        (dave, "training"),
        (erin, "failed"),
        (dave, "pending"),
        (erin, "training"),
        (erin, "active"),
    ):
        await client.post(f"{url}/new_status", json={"status": status}, headers=who)
    history = (await client.get(f"{url}/status-history", headers=dave)).json()
    assert [(h["from_status"], h["to_status"], h["changed_by"]["username"]) for h in history] == [
        ("pending", "training", "dave"),  # the repeated `training` is a no-op: not a change
        ("training", "failed", "erin"),  # failed -> pending was refused (422): not recorded
        ("failed", "training", "erin"),
        ("training", "active", "erin"),
    ]
    assert all(h["changed_at"].endswith("Z") for h in history)
    page = await client.get(f"{url}/status-history?limit=3", headers=dave)
    rest = await client.get(f"{url}/status-history?limit=3&cursor={page.headers['X-Next-Cursor']}", headers=dave)
    assert page.json() + rest.json() == history
    row = [r for r in await audit_rows(session) if r.action == "setmodelversionstatus"][-1]
    assert (row.summary["from"], row.summary["to"]) == ("training", "active")
    assert (await client.get("/v2/models/pricing-model/versions/99/status-history", headers=dave)).status_code == 404


# ---- GET /v2/audit --------------------------------------------------------------------------


async def test_audit_listing_is_tenant_filtered(client, session, admin, auth):
    await tenant_setup(client, session, admin, client_id="client-a", domain_id="same")
    await make_client(session, "client-b")
    await create_domain(client, admin, "client-b", "same")
    await assign(client, admin, "client-b", "same")
    await client.post(
        "/v2/models",
        json={"name": "platform", "description": "d", "handlers": BODIES["createmodel"]["handlers"]},
        headers=admin,
    )

    everything = (await client.get("/v2/audit", headers=admin)).json()
    assert [(r["action"], r["client_id"]) for r in everything] == [
        ("createmodel", None),
        ("putdomainmodelassignment", "client-b"),
        ("createdomain", "client-b"),
        ("putdomainmodelassignment", "client-a"),
        ("createdomain", "client-a"),
    ]
    for tenant in ("client-a", "client-b"):
        for headers in (
            auth(username="u", groups=[f"client:{tenant}"]),
            auth(scopes=["read_domains"], client_id=tenant),
        ):
            rows = (await client.get("/v2/audit", headers=headers)).json()
            assert [r["client_id"] for r in rows] == [tenant, tenant]
            assert {r["target_id"] for r in rows} == {"same", "same/default"}
    tenant_a = auth(username="u", groups=["client:client-a"])
    assert (await client.get("/v2/audit?client_id=client-b", headers=tenant_a)).status_code == 403
    assert (await client.get("/v2/audit", headers=auth(scopes=["read_domains"]))).status_code == 403
    assert (
        await client.get("/v2/audit", headers=auth(scopes=["read_models"], client_id="client-a"))
    ).status_code == 403


async def test_audit_listing_filters_and_pages(client, session, admin, auth):
    await make_client(session, "client-1")
    await make_version(session)
    await make_version(session, version="2")
    frank = auth(subject="u-frank", username="frank", groups=["client:client-1"])
    await create_domain(client, frank, "client-1", DOMAIN_ID, features=[])
    await assign(client, admin, model_version="1")
    await assign(client, frank, model_version="2")

    def get(query: str) -> Any:
        return client.get(f"/v2/audit?{query}", headers=admin)

    rows = (await get("target_type=assignment&target_id=south_australia/default")).json()
    assert [(r["summary"]["model_version"], r["actor"]["username"]) for r in rows] == [("2", "frank"), ("1", None)]
    assert [r["action"] for r in (await get("actor=frank")).json()] == ["putdomainmodelassignment", "createdomain"]
    assert [r["action"] for r in (await get("actor=u-frank&action=createdomain")).json()] == ["createdomain"]
    newest = rows[0]["occurred_at"]
    assert (await get(f"occurred_after={newest}")).json()[0]["occurred_at"] == newest
    assert all(r["occurred_at"] < newest for r in (await get(f"occurred_before={newest}")).json())
    first = await get("limit=2")
    second = await get(f"limit=2&cursor={first.headers['X-Next-Cursor']}")
    assert [r["id"] for r in first.json() + second.json()] == [r["id"] for r in (await get("")).json()]
    assert (await get("cursor=garbage")).status_code == 400


# ---- dry run (14.7) -------------------------------------------------------------------------


async def test_dry_run_of_a_blocked_upsert_answers_the_same_422_and_writes_nothing(client, session, admin):
    await tenant_setup(client, session, admin, features=LIVE)
    await init_service(client, admin, "svc-a", {"route": "Adelaide to Sydney", "competitor_count": 15})
    await init_service(client, admin, "svc-c", {"route": "Sydney to Adelaide", "cabin": "cave"})
    await make_version(session, version="2", features=V2_FEATURES)
    before = await table_counts(session)
    body = {"model_id": "pricing-model", "model_version": "2"}
    dry_put = await client.put(f"{D}/assignments/default?dry_run=true", json=body, headers=admin)
    dry_post = await client.post(
        f"{D}/assignments?dry_run=true", json={"assignment_key": "default", **body}, headers=admin
    )
    assert await table_counts(session) == before
    real = await client.put(f"{D}/assignments/default", json=body, headers=admin)
    assert real.status_code == dry_put.status_code == dry_post.status_code == 422
    assert dry_put.json() == dry_post.json() == real.json()
    assert real.json()["blocking_services"]
    assert await table_counts(session) == before


async def test_dry_run_of_a_passing_upsert_answers_the_counts_and_writes_nothing(client, session, admin):
    await tenant_setup(client, session, admin, features=LIVE)
    await init_service(client, admin, "svc-1", {"route": "Adelaide to Sydney", "cabin": "deck"})
    await init_service(client, admin, "svc-2", {"route": "Sydney to Adelaide", "cabin": "suite", "competitor_count": 2})
    await init_service(client, admin, "svc-3", {"route": "Sydney to Adelaide", "cabin": "deck"})
    await make_version(session, version="2", features=V2_FEATURES)
    departed = {"departure_datetime": "2020-01-01T00:00:00Z"}
    assert (await client.put(f"{D}/service/svc-3", json=departed, headers=admin)).status_code == 200
    before = await table_counts(session)
    stored_before = (await client.get(f"{D}/service/svc-1", headers=admin)).json()
    body = {"model_id": "pricing-model", "model_version": "2", "settings": {"k": 1}}
    r = await client.put(f"{D}/assignments/default?dry_run=true", json=body, headers=admin)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["dry_run"] is True
    assert (answer["services_checked"], answer["services_re_resolved"]) == (2, 2)
    revision = answer["revision"]
    assert revision["assignment_id"] is None and revision["created_at"] is None
    assert (revision["assignment_key"], revision["model_version"], revision["settings"]) == ("default", "2", {"k": 1})
    assert await table_counts(session) == before
    assert (await client.get(f"{D}/service/svc-1", headers=admin)).json() == stored_before
    assert (await client.get(f"{D}/assignments/default", headers=admin)).json()["model_version"] == "1"

    # a non-default key is checked but re-resolves nobody; an archived revision checks nothing
    r = await client.post(f"{D}/assignments?dry_run=true", json={"assignment_key": "forecast", **body}, headers=admin)
    assert (r.json()["services_checked"], r.json()["services_re_resolved"]) == (2, 0)
    r = await client.post(
        f"{D}/assignments?dry_run=true",
        json={"assignment_key": "forecast", **body, "status": "archived"},
        headers=admin,
    )
    assert (r.json()["services_checked"], r.json()["services_re_resolved"]) == (0, 0)
    assert await table_counts(session) == before

    # the real upsert does what the dry run said: the two live services re-resolved
    r = await client.put(f"{D}/assignments/default", json=body, headers=admin)
    assert r.status_code == 200, r.text
    assert uuid.UUID(r.json()["assignment_id"])
    svc1 = (await client.get(f"{D}/service/svc-1", headers=admin)).json()
    assert svc1["resolved_features"] != stored_before["resolved_features"]


async def test_dry_run_keeps_every_other_check(client, session, admin):
    await tenant_setup(client, session, admin)
    r = await client.put(
        f"{D}/assignments/default?dry_run=true", json={"model_id": "pricing-model", "model_version": "9"}, headers=admin
    )
    assert r.status_code == 422 and "does not exist" in r.json()["message"]
    r = await client.put(
        f"{D}/assignments/default?dry_run=maybe",
        json={"model_id": "pricing-model", "model_version": "1"},
        headers=admin,
    )
    assert r.status_code == 400


def test_openapi_documents_the_audit_trail(app):
    doc = app.openapi()
    paths, schemas = doc["paths"], doc["components"]["schemas"]
    assert paths["/v2/audit"]["get"]["operationId"] == "listauditrecords"
    assert {p["name"] for p in paths["/v2/audit"]["get"]["parameters"]} >= {
        "client_id",
        "target_type",
        "target_id",
        "actor",
        "action",
        "occurred_after",
        "occurred_before",
        "limit",
        "cursor",
    }
    history = paths["/v2/models/{model_id}/versions/{model_version}/status-history"]["get"]
    assert history["operationId"] == "listmodelversionstatushistory"
    for name in ("AssignmentOut", "VersionOut", "JobOut", "SubscriptionOut", "DomainOut", "ServiceOut"):
        assert "created_by" in schemas[name]["properties"], name
    for path in (
        "/v2/clients/{client_id}/domains/{domain_id}/assignments",
        "/v2/clients/{client_id}/domains/{domain_id}/assignments/{assignment_key}",
    ):
        operation = next(op for method, op in paths[path].items() if method in ("post", "put"))
        assert "dry_run" in {p["name"] for p in operation["parameters"]}
        answer = operation["responses"]["200"]["content"]["application/json"]["schema"]["anyOf"]
        assert {"$ref": "#/components/schemas/AssignmentDryRun"} in answer
    assert set(schemas["AssignmentDryRun"]["properties"]) == {
        "dry_run",
        "revision",
        "services_checked",
        "services_re_resolved",
    }


def test_the_summary_is_compact_and_masks_credentials():
    from pie.audit.routing import summarize

    summary = summarize({"name": "x" * 500, "input": {"secret_price_floor": 123}, "callback_secret": "s3", "n": 2})
    assert summary == {"name": "x" * 200, "callback_secret": "***", "n": 2, "fields": ["input"]}
