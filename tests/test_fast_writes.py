"""The fast direct-inference layer (pie.http.fast with pie.registry.hot): the success case of POST inference is
answered without the FastAPI route, writing exactly the rows the route writes; every other case
reaches the route, with the body replayed, and answers as the route does."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import psycopg
import pytest
from factories import IN_PROCESS_HANDLERS, make_client, make_version
from sqlalchemy import text

from pie.app import create_app
from pie.audit.models import AuditRecord
from pie.jobs.models import Job

CONTRACTS = {
    "inference": {
        "input_schema": {"type": "object", "properties": {"route": {"type": "string"}}, "required": ["route"]}
    }
}
URL = "/v2/models/m/versions/{v}/inference"


@pytest.fixture
async def plain(engine, settings) -> AsyncIterator[httpx.AsyncClient]:
    """The same application without the fast layers (PIE_FAST_WRITES=false, PIE_FAST_READS=false)."""
    app = create_app(settings.model_copy(update={"fast_writes": False, "fast_reads": False}))
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        yield c


@pytest.fixture
async def world(session) -> None:
    await make_client(session, "client-1")
    await make_client(session, "client-2")
    await make_client(session, "client-3", status="suspended")
    await make_version(session, "m", "1", status="active", handler_contracts=CONTRACTS)
    await make_version(session, "m", "2", status="failed", handler_contracts=CONTRACTS)
    await make_version(session, "m", "3", status="pending", handler_contracts=CONTRACTS)


async def counts(session) -> tuple[int, int]:
    jobs = await session.scalar(text("SELECT count(*) FROM jobs"))
    audit = await session.scalar(text("SELECT count(*) FROM audit_log"))
    return jobs, audit


def raw(headers: dict[str, str], body: Any) -> dict[str, Any]:
    return {"content": json.dumps(body).encode(), "headers": {**headers, "Content-Type": "application/json"}}


async def test_every_caller_and_body_gets_the_answer_of_the_route(client, plain, world, session, auth, admin):
    callers = {
        "none": {},
        "admin": admin,
        "machine tenant": auth(scopes=["run_inference"], client_id="client-1"),
        "human tenant": auth(groups=["client:client-1"], username="alice"),
        "two tenants": auth(groups=["client:client-1", "client:client-2"], username="carol"),
        "suspended tenant": auth(groups=["client:client-3"], username="dave"),
        "no permission": auth(scopes=["read_models"], client_id="client-1"),
        "malformed": {"Authorization": "Bearer not-a-token"},
    }
    ok = {"input": {"route": "Adelaide to Sydney"}}
    requests: dict[str, dict[str, Any]] = {
        "valid": {"json": ok},
        "pending version": {"json": ok, "v": "3"},
        "failed version": {"json": ok, "v": "2"},
        "unknown version": {"json": ok, "v": "9"},
        "unknown model": {"json": ok, "url": "/v2/models/nope/versions/1/inference"},
        "bad model id": {"json": ok, "url": "/v2/models/-x/versions/1/inference"},
        "contract mismatch": {"json": {"input": {"route": 5}}},
        "unknown field": {"json": {**ok, "extra": 1}},
        "wrong type": {"json": {"input": "text"}},
        "no input": {"json": {}},
        "not an object": {"json": [1, 2]},
        "strict bool": {"json": {**ok, "subscribe": "yes"}},
        "named tenant": {"json": {**ok, "client_id": "client-2"}},
        "unknown tenant": {"json": {**ok, "client_id": "client-9"}},
        "suspended named tenant": {"json": {**ok, "client_id": "client-3"}},
        "subscribe": {"json": {**ok, "subscribe": True}},
        "malformed JSON": {"content": b'{"input": {', "ctype": "application/json"},
        "too deep": {"content": ("[" * 80 + "]" * 80).encode(), "ctype": "application/json"},
        "unstorable": {"content": b'{"input": {"a": "\\u0000"}}', "ctype": "application/json"},
        "text content type": {"content": json.dumps(ok).encode(), "ctype": "text/plain"},
        "no content type": {"content": json.dumps(ok).encode(), "ctype": None},
        "json with charset": {"content": json.dumps(ok).encode(), "ctype": "application/json; charset=utf-8"},
        "query string": {"json": ok, "query": "?dry_run=true"},
        "idempotency key": {"json": ok, "headers": {"Idempotency-Key": "k-1"}},
    }
    for who, headers in callers.items():
        for what, spec in requests.items():
            url = spec.get("url") or URL.format(v=spec.get("v", "1"))
            url += spec.get("query", "")
            hdrs = {**headers, **spec.get("headers", {})}
            if "json" in spec:
                kwargs: dict[str, Any] = {"json": spec["json"]}
            else:
                if spec["ctype"] is not None:
                    hdrs["Content-Type"] = spec["ctype"]
                kwargs = {"content": spec["content"]}
            answers = []
            for side, c in enumerate((client, plain)):
                if "Idempotency-Key" in hdrs:  # a key of its own per side and case (not a replay)
                    hdrs["Idempotency-Key"] = f"k-{who}-{side}".replace(" ", "-")
                before = await counts(session)
                r = await c.post(url, headers=hdrs, **kwargs)
                answers.append((r, tuple(a - b for a, b in zip(await counts(session), before, strict=True))))
            (fast, fast_rows), (slow, slow_rows) = answers
            case = f"{what} as {who}"
            assert fast.status_code == slow.status_code, (case, fast.text, slow.text)
            assert fast.headers.get("content-type") == slow.headers.get("content-type"), case
            assert fast_rows == slow_rows, case  # (jobs, audit rows) written
            if fast.status_code == 202:
                assert set(fast.json()) == set(slow.json()) == {"inference_job_id"}, case
                assert fast_rows == (1, 1), case
            else:
                assert fast.json() == slow.json(), case
                assert fast_rows == (0, 0), case
            assert fast.headers["x-request-id"], case


# compared: every column of the tables (a new column is compared without editing this test),
# but those that differ between any two rows by nature (ids, times)
JOB_DIFFERS = {"job_id", "created_at", "updated_at", "next_attempt_at"}
AUDIT_DIFFERS = {"id", "occurred_at", "target_id", "request_id"}
JOB_COLUMNS = ", ".join(c.name for c in Job.__table__.columns if c.name not in JOB_DIFFERS)
AUDIT_COLUMNS = ", ".join(c.name for c in AuditRecord.__table__.columns if c.name not in AUDIT_DIFFERS) + (
    ", target_id = (SELECT job_id FROM jobs WHERE job_id = audit_log.target_id) AS names_the_job"
)


async def rows_of(session, job_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
    job = (await session.execute(text(f"SELECT {JOB_COLUMNS} FROM jobs WHERE job_id = :j"), {"j": job_id})).one()
    audit = (
        await session.execute(text(f"SELECT {AUDIT_COLUMNS} FROM audit_log WHERE target_id = :j"), {"j": job_id})
    ).one()
    return dict(job._mapping), dict(audit._mapping)


def test_the_compared_columns_are_the_tables():
    assert set(Job.__table__.columns.keys()) > JOB_DIFFERS
    assert set(AuditRecord.__table__.columns.keys()) > AUDIT_DIFFERS
    for name in ("input", "created_by", "timeout_seconds", "client_id", "warnings"):
        assert name in JOB_COLUMNS.split(", ")


def hot_write_ids() -> list[str]:
    from pie.app import hot_writes

    return sorted(hot_writes())


@pytest.mark.parametrize("operation_id", hot_write_ids())
def test_each_hot_write_is_a_route_of_the_app(app, operation_id):
    """The fast write table is built from the app's routes: each hot write's template and
    parameter patterns are its route's (a new hot write is checked without editing this test;
    its success case needs a differential test like the one below)."""
    from fastapi.routing import APIRoute

    from pie.app import hot_writes
    from pie.http.fast import route_table
    from pie.routing import flat_routes

    (fast,) = [f for f in route_table(app, hot_writes(), "POST") if f.label.operation_id == operation_id]
    route = next(r for r in flat_routes(app.routes) if isinstance(r, APIRoute) and r.operation_id == operation_id)
    assert fast.label.path == route.path and "POST" in route.methods
    assert operation_id == "infermodelversion", f"{operation_id}: add its differential test to this module"


@pytest.mark.parametrize(
    "caller, body",
    [
        ({"scopes": ["run_inference"], "client_id": "client-1"}, {"input": {"route": "A", "n": [1, {"x": None}]}}),
        ({"groups": ["client:client-1", "client:client-2"], "username": "carol"}, {"input": {"route": "B"}}),
        (
            {"groups": ["client:client-1", "client:client-2"], "username": "carol"},
            {"input": {"route": "C"}, "client_id": "client-2", "subscribe": False},
        ),
        ({"admin": True}, {"input": {"route": "D", "token": "secret"}}),
    ],
)
async def test_the_success_case_writes_what_the_route_writes(
    client, plain, world, session, auth, monkeypatch, caller, body
):
    from pie.registry import logic

    async def route_ran(*args, **kwargs):
        raise AssertionError("the FastAPI route answered")

    headers = auth(**caller)
    slow = await plain.post(URL.format(v="1"), json=body, headers=headers)
    assert slow.status_code == 202, slow.text
    with monkeypatch.context() as patched:
        patched.setattr(logic, "run_inference", route_ran)
        fast = await client.post(URL.format(v="1"), json=body, headers={**headers, "X-Request-ID": "fast-1"})
    assert fast.status_code == 202, fast.text
    assert fast.headers["x-request-id"] == "fast-1"
    fast_job, fast_audit = await rows_of(session, fast.json()["inference_job_id"])
    slow_job, slow_audit = await rows_of(session, slow.json()["inference_job_id"])
    assert fast_job == slow_job
    assert fast_audit == slow_audit and fast_audit["names_the_job"] is True
    request_id = await session.scalar(
        text("SELECT request_id FROM audit_log WHERE target_id = :j"), {"j": fast.json()["inference_job_id"]}
    )
    assert request_id == "fast-1"


async def test_the_handler_time_out_and_a_job_the_dispatcher_can_read(client, session, auth, admin):
    handlers = {**IN_PROCESS_HANDLERS, "inference": {"type": "in_process", "value": "echo", "timeout_seconds": 7}}
    await make_version(session, "t", "1", handlers=handlers)
    r = await client.post("/v2/models/t/versions/1/inference", json={"input": {"a": 1}}, headers=admin)
    assert r.status_code == 202, r.text
    job = await client.get(f"/v2/jobs/{r.json()['inference_job_id']}", headers=admin)
    assert job.status_code == 200 and job.json()["status"] == "pending" and job.json()["input"] == {"a": 1}
    assert await session.scalar(text("SELECT timeout_seconds FROM jobs")) == 7


async def test_a_payload_over_its_handler_limit_is_the_routes_422(client, world, session, settings, admin):
    # the body fits PIE_MAX_REQUEST_BYTES, the in-process payload built from it does not
    filler = "x" * (settings.max_request_bytes - 200)
    await make_version(session, "big", "1")
    r = await client.post("/v2/models/big/versions/1/inference", json={"input": {"f": filler}}, headers=admin)
    assert r.status_code == 422, r.text
    assert "job payload too large" in r.json()["message"]
    assert await counts(session) == (0, 0)


async def test_a_chunked_body_over_the_limit_is_413_and_writes_nothing(client, world, session, settings, admin):
    chunk = b" " * 65536

    async def body():
        yield b'{"input": {"route": "A"}, "pad": "'
        for _ in range(settings.max_request_bytes // len(chunk) + 2):
            yield chunk
        yield b'"}'

    r = await client.post(URL.format(v="1"), content=body(), headers={**admin, "Content-Type": "application/json"})
    assert r.status_code == 413, r.text
    assert "too large" in r.json()["message"]
    assert await counts(session) == (0, 0)


async def test_a_failed_commit_is_answered_once_and_never_retried_by_the_route(
    client, world, session, admin, monkeypatch
):
    """The commit's outcome is unknown: the layer answers 503 itself instead of handing the
    request to the route, which would launch the job a second time."""
    from pie.registry import logic

    ran: list[bool] = []

    async def route_ran(*args, **kwargs):
        ran.append(True)
        raise AssertionError("the route ran after a failed commit")

    async def failing_commit(self):
        await self.rollback()
        raise psycopg.OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(logic, "run_inference", route_ran)
    monkeypatch.setattr(psycopg.AsyncConnection, "commit", failing_commit)
    r = await client.post(URL.format(v="1"), json={"input": {"route": "A"}}, headers=admin)
    monkeypatch.undo()
    assert r.status_code == 503, r.text
    assert r.headers["retry-after"] == "1"
    assert r.json()["message"] == "database unavailable; try again later"
    assert ran == []
    assert await counts(session) == (0, 0)


async def test_a_failed_insert_is_answered_by_the_layer_with_the_routes_envelope(
    client, world, session, admin, monkeypatch
):
    """Once the version is read the layer has released the body and answers every outcome: a
    database error in the INSERT gets the 503 envelope of the route's error handler."""
    from pie.registry import logic

    async def route_ran(*args, **kwargs):
        raise AssertionError("the route ran after the layer had taken the request")

    real_execute = psycopg.AsyncCursor.execute

    async def execute(self, query, params=None, **kwargs):
        if isinstance(query, str) and query.startswith("WITH job AS"):
            raise psycopg.errors.QueryCanceled("canceling statement due to statement timeout")
        return await real_execute(self, query, params, **kwargs)

    monkeypatch.setattr(logic, "run_inference", route_ran)
    monkeypatch.setattr(psycopg.AsyncCursor, "execute", execute)
    r = await client.post(URL.format(v="1"), json={"input": {"route": "A"}}, headers=admin)
    monkeypatch.undo()
    assert r.status_code == 503, r.text
    assert r.headers["retry-after"] == "1"
    assert r.json()["message"].startswith("database timeout")
    assert await counts(session) == (0, 0)
    # and the connection it used is fine for the next request
    ok = await client.post(URL.format(v="1"), json={"input": {"route": "A"}}, headers=admin)
    assert ok.status_code == 202, ok.text
