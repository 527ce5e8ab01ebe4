"""The fast reads (pie.http.fast with the hot readers of jobs, assignments, tenancy, health): the hot GETs answer exactly as their FastAPI routes do — the
success case from the fast layer, every other case (401, 403, 404, 400, query strings) from the
route itself."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone

import httpx
import pytest
from factories import assign, domain_url, init_service, make_version, tenant_setup
from sqlalchemy import text

from pie.app import create_app
from pie.http.fast import RouteLabel

D = domain_url("client-1", "south_australia")


@pytest.fixture
async def plain(engine, settings) -> AsyncIterator[httpx.AsyncClient]:
    """The same application without the fast layer (PIE_FAST_READS=false)."""
    app = create_app(settings.model_copy(update={"fast_reads": False}))
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        yield c


@pytest.fixture
async def world(client, session, admin, auth) -> dict[str, str]:
    await tenant_setup(client, session, admin)
    await init_service(client, admin, "svc-1", {"route": "Adelaide to Sydney"})
    await init_service(client, admin, "svc-gone", {"route": "Sydney to Adelaide"})
    past = (datetime.now(timezone.utc) - timedelta(hours=1)).isoformat()
    r = await client.put(f"{D}/service/svc-gone", json={"departure_datetime": past}, headers=admin)
    assert r.status_code == 200, r.text
    r = await client.post(
        f"{D}/assignments/default/jobs", json={"input": {"route": "Adelaide to Sydney"}}, headers=admin
    )
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    # a cancelled job and its retry (spec 15.4: error.code "cancelled", retry_of)
    assert (await client.post(f"/v2/jobs/{job_id}/cancel", headers=admin)).status_code == 200
    r = await client.post(f"/v2/jobs/{job_id}/retry", headers=admin)
    assert r.status_code == 202, r.text
    return {"job": job_id, "retry": r.json()["job_id"]}


def paths(job_id: str, *more_jobs: str) -> list[str]:
    return [
        f"/v2/jobs/{job_id}",
        *(f"/v2/jobs/{other}" for other in more_jobs),
        "/v2/health",
        f"{D}/assignments/default",
        f"{D}/service/svc-1",
        f"{D}/service/svc-gone",
        # not found at every level: the route's own 404s
        "/v2/jobs/no-such-job",
        f"{D}/assignments/nokey",
        f"{D}/service/no-such-service",
        "/v2/clients/client-1/domains/nodomain/service/svc-1",
        "/v2/clients/client-2/domains/south_australia/service/svc-1",
        "/v2/clients/client-2/domains/south_australia/assignments/default",
        # invalid ids (400), query strings (strict, and ?wait)
        f"{D}/assignments/UPPER",
        "/v2/jobs/-bad",
        f"{D}/service/svc-1?unknown=1",
        f"/v2/jobs/{job_id}?wait=0",
    ]


async def test_every_caller_gets_the_answer_of_the_route(client, plain, world, admin, auth):
    callers = {
        "none": {},
        "admin": admin,
        "machine tenant": auth(scopes=["read_models", "read_domains", "run_inference"], client_id="client-1"),
        "human tenant": auth(groups=["client:client-1"], username="alice"),
        "other tenant": auth(groups=["client:client-2"], username="bob"),
        "no permission": auth(scopes=["manage_models"], client_id="client-1"),
        "malformed": {"Authorization": "Bearer not-a-token"},
        "wrong scheme": {"Authorization": "Basic abc"},
    }
    for name, headers in callers.items():
        for path in paths(world["job"], world["retry"]):
            for method in ("GET", "HEAD"):
                fast = await client.request(method, path, headers=headers)
                slow = await plain.request(method, path, headers=headers)
                what = f"{method} {path} as {name}"
                assert fast.status_code == slow.status_code, what
                assert fast.headers.get("content-type") == slow.headers.get("content-type"), what
                if method == "HEAD":
                    assert fast.content == b"", what
                elif fast.status_code == 200:
                    assert fast.json() == slow.json(), what
                else:
                    assert fast.json() == slow.json(), what


async def test_the_success_case_never_reaches_the_route(client, world, auth, monkeypatch):
    from pie.assignments import logic as assignments
    from pie.jobs import routes as jobs
    from pie.tenancy import logic as tenancy

    def route_ran(*args, **kwargs):
        raise AssertionError("the FastAPI route answered")

    monkeypatch.setattr(assignments, "get_active", route_ran)
    monkeypatch.setattr(tenancy, "get_service", route_ran)
    monkeypatch.setattr(jobs, "json_response", route_ran)
    tenant = auth(scopes=["read_models", "read_domains"], client_id="client-1")
    for path in [p for p in paths(world["job"], world["retry"])[:6] if p != "/v2/health"]:
        r = await client.get(path, headers=tenant)
        assert r.status_code == 200, (path, r.text)
        assert r.headers["x-request-id"]  # the outer layers still run
    assert (await client.get(f"{D}/service/svc-gone", headers=tenant)).json()["departed"] is True
    # anything else is the route's: here it reaches the patched route (a 500 envelope)
    assert (await client.get(f"{D}/service/svc-1?x=1", headers=tenant)).status_code == 400
    assert (await client.get(f"{D}/assignments/default", headers={})).status_code == 401


async def test_read_connections_the_server_dropped_are_replaced(client, world, admin, session):
    """The reads' own pool (autocommit, pie.db.read_pool): when PostgreSQL ends its sessions
    (a restart, a failover), the requests that meet a dead connection get the 503 envelope and
    the pool replaces the connection: reads work again without a restart of PIE."""
    path = f"/v2/jobs/{world['job']}"
    assert (await client.get(path, headers=admin)).status_code == 200
    killed = await session.scalar(
        text(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = 'pie-reads'"
        )
    )
    await session.commit()
    assert killed >= 1
    answers = []
    for _ in range(killed + 2):
        r = await client.get(path, headers=admin)
        answers.append(r.status_code)
        if r.status_code == 503:
            assert r.json()["message"] == "database unavailable; try again later"
            assert r.headers["retry-after"] == "1"
        if r.status_code == 200:
            break
    assert answers[-1] == 200, answers
    assert set(answers) <= {200, 503}, answers


async def test_jobs_in_every_state_read_the_same_on_both_paths(client, plain, world, admin, session):
    """The job fields of issue 17 (``dispatch``; ``error`` and ``started_at`` null while a
    dispatch is retried) come out of the fast layer exactly as out of the route, in every state."""
    ids = {}
    for state in ("retrying", "started", "success", "failure", "failure after retries"):
        r = await client.post(f"{D}/assignments/default/jobs", json={"input": {"state": state}}, headers=admin)
        ids[state] = r.json()["job_id"]
    retry_error = '{"code": "aws_error", "message": "throttled", "attempts": 1, "backend": "lambda"}'
    updates = {
        "retrying": "status = 'pending', attempts = 1, dispatch_error = CAST(:e AS jsonb),"
        " next_attempt_at = now() + interval '30 seconds'",
        "started": "status = 'started', attempts = 2, started_at = now(), dispatch_error = CAST(:e AS jsonb)",
        "success": "status = 'success', attempts = 1, started_at = now(), completed_at = now(), output = '{\"p\": 1}'",
        "failure": "status = 'failure', attempts = 1, started_at = now(), completed_at = now(),"
        ' error = \'{"code": "deliberate_failure", "message": "no"}\'',
        "failure after retries": "status = 'failure', attempts = 3, started_at = now(), completed_at = now(),"
        ' dispatch_error = CAST(:e AS jsonb), error = \'{"code": "aws_error", "message": "gave up"}\'',
    }
    for state, values in updates.items():
        await session.execute(text(f"UPDATE jobs SET {values} WHERE job_id = :j"), {"j": ids[state], "e": retry_error})
    await session.commit()
    for state, job_id in {**ids, "pending": world["job"]}.items():
        fast = await client.get(f"/v2/jobs/{job_id}", headers=admin)
        slow = await plain.get(f"/v2/jobs/{job_id}", headers=admin)
        assert fast.status_code == slow.status_code == 200, state
        assert fast.json() == slow.json(), state
        body = fast.json()
        assert (body["error"] is None) == (body["status"] != "failure"), state
        if state in ("retrying", "started", "failure after retries"):
            assert body["dispatch"]["last_error"] == {"code": "aws_error", "message": "throttled"}, state
            assert body["dispatch"]["attempts"] == body["attempts"], state
            assert (body["dispatch"]["next_attempt_at"] is None) == (state != "retrying"), state
        else:
            assert body["dispatch"] is None, state
    # and the list route shows the same objects
    listed = {j["job_id"]: j for j in (await client.get("/v2/jobs?limit=1000", headers=admin)).json()}
    for job_id in ids.values():
        assert listed[job_id] == (await client.get(f"/v2/jobs/{job_id}", headers=admin)).json()


async def test_experiment_fields_read_the_same_on_both_paths(client, plain, world, admin, session):
    """Spec 15.7: a revision's ``split`` and ``shadow``, a job's ``arm`` and ``shadow_of`` come
    out of the fast layer exactly as out of the routes."""
    for version in ("2", "3"):
        await make_version(session, version=version)
    r = await assign(
        client,
        admin,
        split=[{"model_id": "pricing-model", "model_version": "2", "percent": 40}],
        shadow=[{"model_id": "pricing-model", "model_version": "3"}],
    )
    revision = r.json()
    init = (await init_service(client, admin, "svc-x", {"route": "Adelaide to Sydney"})).json()
    shadow = (await client.get("/v2/jobs", params={"arm": "shadow"}, headers=admin)).json()
    assert [j["shadow_of"] for j in shadow] == [init["job_id"]]
    for path in (f"{D}/assignments/default", f"/v2/jobs/{init['job_id']}", f"/v2/jobs/{shadow[0]['job_id']}"):
        fast = await client.get(path, headers=admin)
        slow = await plain.get(path, headers=admin)
        assert fast.status_code == slow.status_code == 200, path
        assert fast.json() == slow.json(), path
    assert (await client.get(f"{D}/assignments/default", headers=admin)).json()["split"] == revision["split"]
    fast_shadow = (await client.get(f"/v2/jobs/{shadow[0]['job_id']}", headers=admin)).json()
    assert fast_shadow["arm"] == "shadow" and fast_shadow["shadow_of"] == init["job_id"]
    assert (await client.get(f"/v2/jobs/{init['job_id']}", headers=admin)).json()["arm"] in ("primary", "split")


# -- generated from the fast table: every hot GET of the app, compared with its route ------------

# a value of each path parameter a hot route may have (the world fixture's rows); a new hot route
# with another parameter fails below until its sample is added here
SAMPLES = {
    "client_id": "client-1",
    "domain_id": "south_australia",
    "service_id": "svc-1",
    "assignment_key": "default",
}


def read_table(app):
    from pie.app import hot_reads
    from pie.http.fast import route_table

    return {fast.label.operation_id: fast for fast in route_table(app, hot_reads(), "GET")}


def hot_read_ids() -> list[str]:
    from pie.app import hot_reads

    return sorted(hot_reads())


def sample_path(template: str, world: dict[str, str]) -> str:
    values = {**SAMPLES, "job_id": world["job"]}
    for name in re.findall(r"\{(\w+)\}", template):
        assert name in values, f"no sample value for {{{name}}}: add one to SAMPLES"
        template = template.replace(f"{{{name}}}", values[name])
    return template


@pytest.mark.parametrize("operation_id", hot_read_ids())
async def test_each_hot_read_answers_as_its_route_and_skips_it(app, client, plain, world, admin, auth, operation_id):
    """For every entry of the fast table (built from the app's routes): the success case is
    answered by the fast layer (the route's handler never runs), with the route's status, type
    and body; the table's regex is the route's template with the route's parameter patterns."""
    from fastapi.routing import APIRoute

    from pie.routing import flat_routes

    fast = read_table(app)[operation_id]
    route = next(r for r in flat_routes(app.routes) if isinstance(r, APIRoute) and r.operation_id == operation_id)
    assert fast.label.path == route.path
    path = sample_path(route.path, world)
    assert fast.regex.fullmatch(path)
    answered: list[str] = []  # who answered each request: "fast" (the layer) or "route"

    async def spy(scope, receive, send):
        await app(scope, receive, send)
        answered.append("fast" if isinstance(scope.get("route"), RouteLabel) else "route")

    transport = httpx.ASGITransport(app=spy, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as spied:
        tenant = auth(scopes=["read_models", "read_domains", "run_inference"], client_id="client-1")
        callers = [{}] if fast.hot.public else [admin, tenant]
        for headers in callers:
            fast_answer = await spied.get(path, headers=headers)
            slow = await plain.get(path, headers=headers)
            assert fast_answer.status_code == slow.status_code == 200, (path, fast_answer.text)
            assert fast_answer.headers["content-type"] == slow.headers["content-type"]
            assert fast_answer.json() == slow.json()
        assert answered == ["fast"] * len(callers), "the route answered a success case"
        if route.path.endswith("}"):
            # anything else is the route's: here a row that does not exist (the route's 404)
            missing = path.rsplit("/", 1)[0] + "/nosuch"
            fast_answer = await spied.get(missing, headers=admin)
            slow = await plain.get(missing, headers=admin)
            assert fast_answer.status_code == slow.status_code == 404, fast_answer.text
            assert fast_answer.json() == slow.json()
            assert answered[-1] == "route"


def test_the_fast_layer_refuses_to_start_without_its_route(settings, monkeypatch):
    """A hot reader naming an operation id the app has no route for (a renamed or removed
    route) stops the app from being built, with the operation id in the message."""
    from pie import app as app_module

    real = app_module.hot_reads
    monkeypatch.setattr(app_module, "hot_reads", lambda: {**real(), "getjobrenamed": real()["getjob"]})
    with pytest.raises(RuntimeError, match="getjobrenamed"):
        create_app(settings)


@pytest.mark.parametrize("operation_id", hot_read_ids())
def test_each_hot_read_selects_every_column_its_answer_shows(operation_id):
    """The Core read of each hot GET selects every column of its table that the response
    model shows (taken from the tables: a new column is covered without editing this test)."""
    from pie.assignments.logic import _READ_ACTIVE_DOMAIN_REVISION
    from pie.assignments.schemas import AssignmentOut
    from pie.jobs.logic import _READ_JOB
    from pie.jobs.schemas import JobOut
    from pie.tenancy.logic import _READ_SERVICE
    from pie.tenancy.schemas import ServiceOut

    reads = {
        "getjob": (_READ_JOB, JobOut),
        "getdomainmodelassignment": (_READ_ACTIVE_DOMAIN_REVISION, AssignmentOut),
        "getdomainservice": (_READ_SERVICE, ServiceOut),
        "health": None,
    }
    assert operation_id in reads, f"hot read {operation_id}: add its Core read here"
    if reads[operation_id] is None:
        return
    stmt, model = reads[operation_id]
    (table,) = {c.table for c in stmt.selected_columns}
    selected = {c.key for c in stmt.selected_columns}
    shown = {name for name, field in model.model_fields.items() if (field.alias or name) in table.c or name in table.c}
    missing = sorted(c.key for c in table.c if c.key in shown and c.key not in selected)
    assert missing == [], f"{operation_id}: its read does not select {missing}"
