"""The error envelope (spec 1.1) for every status, the database safety net, the unit of work,
request ids, health when the database is down, and CORS."""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import select, text

from pie import db
from pie.app import create_app
from pie.clients import logic as clients_logic
from pie.config import Settings
from pie.deps import Session, require
from pie.errors import AssignmentBlocked, BadRequest, Conflict, Forbidden, NotFound, ServiceUnavailable, Unprocessable
from pie.tables.clients import Client


def assert_envelope(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"success", "message"}, body
    assert body["success"] is False
    assert isinstance(body["message"], str) and body["message"]
    return body["message"]


# --- 400 ----------------------------------------------------------------------------------------


async def test_400_malformed_json(client, admin):
    r = await client.post(
        "/v2/clients", content=b'{"client_id": "x", ', headers={**admin, "Content-Type": "application/json"}
    )
    assert "malformed JSON" in assert_envelope(r, 400)


async def test_400_not_an_object(client, admin):
    for payload in ([1, 2], "text", 3, None):
        r = await client.post("/v2/clients", json=payload, headers=admin)
        assert_envelope(r, 400)


async def test_400_wrong_type(client, admin):
    r = await client.post("/v2/clients", json={"client_id": "x", "name": 5}, headers=admin)
    assert "name" in assert_envelope(r, 400)
    # strict: no silent coercion of a number into the identifier string
    r = await client.post("/v2/clients", json={"client_id": 12, "name": "x"}, headers=admin)
    assert "client_id" in assert_envelope(r, 400)
    r = await client.patch("/v2/clients/x", json={"status": "deleted"}, headers=admin)
    assert "status" in assert_envelope(r, 400)


async def test_400_missing_field(client, admin):
    r = await client.post("/v2/clients", json={"client_id": "x"}, headers=admin)
    message = assert_envelope(r, 400)
    assert "name" in message and "required" in message.lower()
    r = await client.post("/v2/clients", headers=admin)  # no body at all
    assert_envelope(r, 400)


async def test_400_invalid_values(client, admin):
    for body in (
        {"client_id": "bad id", "name": "x"},
        {"client_id": "-x", "name": "x"},
        {"client_id": "x", "name": "  "},
    ):
        assert_envelope(await client.post("/v2/clients", json=body, headers=admin), 400)


@pytest.mark.parametrize("client_id", ["bad!id", "-leading-dash", "a" * 129, "sp%20ace", "%C3%A9t%C3%A9", ".dot"])
async def test_400_bad_path_id(client, admin, client_id):
    r = await client.get(f"/v2/clients/{client_id}", headers=admin)
    assert "client_id" in assert_envelope(r, 400)


async def test_path_id_boundaries_are_accepted(client, admin):
    longest = "a" * 128
    r = await client.post("/v2/clients", json={"client_id": longest, "name": "Long"}, headers=admin)
    assert r.status_code == 201
    assert (await client.get(f"/v2/clients/{longest}", headers=admin)).status_code == 200
    assert (await client.get("/v2/clients/A1._:-z", headers=admin)).status_code == 404


@pytest.mark.parametrize(
    "query", ["limit=0", "limit=1001", "limit=abc", "cursor=%%%", "cursor=bm90LWpzb24", "cursor=e30"]
)
async def test_400_bad_query(client, admin, query):
    assert_envelope(await client.get(f"/v2/clients?{query}", headers=admin), 400)


# --- 404, 405, 409 -------------------------------------------------------------------------------


async def test_404_unknown_route(client, admin):
    message = assert_envelope(await client.get("/v2/nothing-here", headers=admin), 404)
    assert "/v2/nothing-here" in message
    assert_envelope(await client.get("/nothing-here"), 404)


async def test_404_unknown_client(client, admin):
    assert assert_envelope(await client.get("/v2/clients/ghost", headers=admin), 404) == "client ghost not found"


async def test_405(client, admin):
    r = await client.delete("/v2/clients", headers=admin)
    assert "DELETE" in assert_envelope(r, 405)
    assert "GET" in r.headers["allow"] and "POST" in r.headers["allow"]
    assert_envelope(await client.put("/v2/health"), 405)


async def test_409_duplicate_client(client, admin, session):
    r = await client.post("/v2/clients", json={"client_id": "dup", "name": "First"}, headers=admin)
    assert r.status_code == 201
    r = await client.post("/v2/clients", json={"client_id": "dup", "name": "Second"}, headers=admin)
    assert assert_envelope(r, 409) == "client dup already exists"
    stored = (await session.scalars(select(Client.name).where(Client.client_id == "dup"))).all()
    assert stored == ["First"]


# --- a test-local app: every PieError, unexpected exceptions, the database safety net ---------------


class Boom(Exception):
    pass


@pytest.fixture(scope="module")
def local_app(engine) -> FastAPI:
    app = create_app(Settings(_env_file=None, cors_origins=["https://ui.example.com"]))

    @app.get("/test/raise/{kind}")
    async def raise_(kind: str):
        errors = {
            "400": BadRequest("bad thing"),
            "403": Forbidden("nope"),
            "404": NotFound("no such thing"),
            "409": Conflict("already there"),
            "422": Unprocessable("domain is not active"),
            "503": ServiceUnavailable("lambda down"),
            "blocked": AssignmentBlocked("assignment blocked", [{"service_id": "s1", "missing_features": ["x"]}]),
        }
        if kind in errors:
            raise errors[kind]
        raise Boom("secret-internal-detail /etc/passwd line 42")

    @app.post("/test/write-then-fail")
    async def write_then_fail(session: Session):
        session.add(Client(client_id="half-written", name="x"))
        await session.flush()
        raise Boom("after the write")

    @app.post("/test/duplicate/{when}")
    async def duplicate(when: str, session: Session):
        session.add(Client(client_id="taken", name="again"))
        if when == "flush":
            await session.flush()
        return {"ok": True}  # "commit": the violation surfaces when the unit of work commits

    @app.post("/test/check-violation")
    async def check_violation(session: Session):
        session.add(Client(client_id="weird", name="x", status="bogus"))
        await session.flush()

    @app.post("/test/write")
    async def write(session: Session, principal=require("admin")):
        session.add(Client(client_id="uow", name="Unit of work"))
        return {"ok": True}

    return app


@pytest.fixture
async def local(local_app) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=local_app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        yield c


@pytest.mark.parametrize(
    "kind,status", [("400", 400), ("403", 403), ("404", 404), ("409", 409), ("422", 422), ("503", 503)]
)
async def test_pie_errors_render_the_envelope(local, kind, status):
    assert_envelope(await local.get(f"/test/raise/{kind}"), status)


async def test_assignment_blocked_has_its_documented_body(local):
    r = await local.get("/test/raise/blocked")
    assert r.status_code == 422
    assert r.json() == {
        "error": "assignment blocked",
        "blocking_services": [{"service_id": "s1", "missing_features": ["x"]}],
    }


async def test_500_is_the_envelope_without_traceback_and_is_logged_with_request_id(local, caplog):
    caplog.set_level(logging.ERROR)
    r = await local.get("/test/raise/boom", headers={"X-Request-ID": "req-abc-123"})
    message = assert_envelope(r, 500)
    assert "req-abc-123" in message
    assert "secret-internal-detail" not in r.text and "Traceback" not in r.text and "Boom" not in r.text
    assert r.headers["x-request-id"] == "req-abc-123"
    records = [rec for rec in caplog.records if "req-abc-123" in rec.getMessage()]
    assert records, "the failure is logged with the request id"
    assert any(rec.exc_info and rec.exc_info[0] is Boom for rec in records), "with the traceback, in the log"


async def test_500_gets_a_generated_request_id(local):
    r = await local.get("/test/raise/boom")
    request_id = r.headers["x-request-id"]
    assert len(request_id) >= 16 and request_id in r.json()["message"]


async def test_500_from_a_real_route_writes_nothing(client, admin, session, monkeypatch):
    async def broken(*args, **kwargs):
        raise Boom("logic bug")

    monkeypatch.setattr(clients_logic, "list_clients", broken)
    assert_envelope(await client.get("/v2/clients", headers=admin), 500)


async def test_failed_request_leaves_no_half_written_change(local, session):
    assert_envelope(await local.post("/test/write-then-fail"), 500)
    assert await session.get(Client, "half-written") is None


@pytest.mark.parametrize("when", ["flush", "commit"])
async def test_integrity_error_safety_net_is_409(local, client, admin, session, when):
    await client.post("/v2/clients", json={"client_id": "taken", "name": "original"}, headers=admin)
    message = assert_envelope(await local.post(f"/test/duplicate/{when}"), 409)
    assert "already exists" in message and "pk_clients" in message
    assert (await session.get(Client, "taken")).name == "original"


async def test_check_violation_safety_net_is_422(local, session):
    assert "ck_clients_status" in assert_envelope(await local.post("/test/check-violation"), 422)
    assert await session.get(Client, "weird") is None


async def test_unit_of_work_commits_before_the_response(local, admin, engine):
    r = await local.post("/test/write", headers=admin)
    assert r.status_code == 200
    # a different connection sees the write as soon as the response is in
    async with engine.connect() as conn:
        assert (
            await conn.execute(text("SELECT name FROM clients WHERE client_id = 'uow'"))
        ).scalar_one() == "Unit of work"


async def test_created_client_is_visible_right_after_the_response(client, admin, engine):
    r = await client.post("/v2/clients", json={"client_id": "visible", "name": "V"}, headers=admin)
    assert r.status_code == 201
    async with engine.connect() as conn:
        row = (
            await conn.execute(text("SELECT client_uuid::text, status FROM clients WHERE client_id = 'visible'"))
        ).one()
    assert row == (r.json()["client_uuid"], "active")


# --- request ids, CORS -------------------------------------------------------------------------------


async def test_request_id_is_echoed_or_generated(client):
    r = await client.get("/v2/health", headers={"X-Request-ID": "my-id-1"})
    assert r.headers["x-request-id"] == "my-id-1"
    r1, r2 = await client.get("/v2/health"), await client.get("/v2/health", headers={"X-Request-ID": "x" * 500})
    assert r1.headers["x-request-id"] and r2.headers["x-request-id"] != "x" * 500
    assert r1.headers["x-request-id"] != r2.headers["x-request-id"]


async def test_cors_when_origins_configured(local):
    preflight = await local.options(
        "/v2/clients",
        headers={
            "Origin": "https://ui.example.com",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "https://ui.example.com"
    r = await local.get("/v2/health", headers={"Origin": "https://ui.example.com"})
    assert r.headers["access-control-allow-origin"] == "https://ui.example.com"
    assert "X-Next-Cursor" in r.headers["access-control-expose-headers"]
    # errors carry CORS headers too, so a browser can read the envelope
    r = await local.get("/test/raise/boom", headers={"Origin": "https://ui.example.com"})
    assert r.status_code == 500 and r.headers["access-control-allow-origin"] == "https://ui.example.com"
    r = await local.get("/v2/clients", headers={"Origin": "https://ui.example.com"})
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "https://ui.example.com"
    # other origins get nothing
    r = await local.get("/v2/health", headers={"Origin": "https://evil.example.com"})
    assert "access-control-allow-origin" not in r.headers


async def test_no_cors_headers_without_configuration(client):
    r = await client.get("/v2/health", headers={"Origin": "https://ui.example.com"})
    assert "access-control-allow-origin" not in r.headers


# --- the database is down ------------------------------------------------------------------------------


@pytest.fixture
async def database_down(engine, settings):
    """The process's engine and reads' pool pointed at a port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    saved = db.save_engine()
    db.init_engine(f"postgresql://postgres@127.0.0.1:{port}/pie", settings.model_copy(update={"db_connect_timeout": 1}))
    try:
        yield
    finally:
        await db.dispose_engine()
        db.restore_engine(saved)


async def test_health_503_when_database_down(client, database_down):
    r = await client.get("/v2/health")
    assert r.status_code == 503
    assert r.json() == {"status": "degraded", "database": "unavailable"}


async def test_routes_503_when_database_down(client, admin, database_down):
    assert "database unavailable" in assert_envelope(await client.get("/v2/clients", headers=admin), 503)


async def test_health_ok(client):
    r = await client.get("/v2/health")
    assert r.status_code == 200 and r.json() == {"status": "ok", "database": "ok"}


async def test_openapi_is_served_with_operation_ids(client):
    r = await client.get("/v2/openapi.json")
    assert r.status_code == 200
    ops = {op["operationId"] for path in r.json()["paths"].values() for op in path.values() if "operationId" in op}
    assert {"listclients", "createclient", "getclient", "updateclient", "health"} <= ops
    assert (await client.get("/v2/docs")).status_code == 200
    # errors are documented as they are sent: the 400 envelope, never FastAPI's 422 body
    doc = r.json()
    assert "HTTPValidationError" not in r.text
    envelope_ref = {"$ref": "#/components/schemas/ErrorEnvelope"}
    create = doc["paths"]["/v2/clients"]["post"]
    for status in ("400", "401", "403"):
        assert create["responses"][status]["content"]["application/json"]["schema"] == envelope_ref
    # FastAPI's 422 is gone; createclient's 422 is the reused Idempotency-Key, as an envelope
    assert create["responses"]["422"]["content"]["application/json"]["schema"] == envelope_ref
    assert "Idempotency-Key" in create["responses"]["422"]["description"]
    assert "422" not in doc["paths"]["/v2/clients/{client_id}"]["patch"]["responses"]
    health = doc["paths"]["/v2/health"]["get"]
    assert "security" not in health and "401" not in health["responses"]


def test_openapi_has_one_error_envelope_schema(app):
    """Every documented error body is the one ErrorEnvelope component (plus the blocked-upsert
    body), so generated clients get one error type."""
    components = app.openapi()["components"]["schemas"]
    envelopes = [
        name for name, schema in components.items() if set(schema.get("properties", {})) == {"success", "message"}
    ]
    assert envelopes == ["ErrorEnvelope"]
    assert "AssignmentBlockedOut" in components
