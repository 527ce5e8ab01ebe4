"""Regressions from fuzzing the API (schemathesis against `pie serve`, plus hand-made inputs):
each test sends the minimal reproducer of a former 500 or contract violation through the app and
asserts the 4xx envelope (and that nothing was written)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from decimal import Decimal

import httpx
import pytest
from sqlalchemy import Column, Numeric, select

from pie.app import create_app
from pie.errors import BadRequest
from pie.pagination import _typed
from pie.tables.clients import Client


def assert_envelope(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"success", "message"} and body["success"] is False, body
    assert isinstance(body["message"], str) and body["message"]
    return body["message"]


def cursor(values: list) -> str:
    """A cursor as the server encodes them (urlsafe base64 of a JSON array, unpadded)."""
    return base64.urlsafe_b64encode(json.dumps(values).encode()).decode().rstrip("=")


def signed(settings, payload: str) -> str:
    """An HS256 token over a raw JSON payload, correctly signed with the development secret:
    the claims can hold what no well-behaved issuer would write (Infinity, deep nesting)."""

    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    head = b64(b'{"alg":"HS256","typ":"JWT"}')
    body = b64(payload.encode())
    signature = hmac.new(settings.jwt_secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(signature)}"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# --- cursors: values the key column cannot hold were a database error (500) --------------------


@pytest.mark.parametrize("path", ["/v2/clients", "/v2/jobs"])
async def test_cursor_with_an_unpaired_surrogate_is_400(client, admin, path):
    # was: UnicodeEncodeError in psycopg while sending the text key -> 500
    r = await client.get(path, params={"cursor": cursor(["\ud800"])}, headers=admin)
    assert assert_envelope(r, 400) == "invalid cursor"


@pytest.mark.parametrize("value", [2**63, -(2**63) - 1, 10**30, str(2**63)])
async def test_cursor_integer_outside_bigint_is_400(client, admin, value):
    # was: psycopg NumericValueOutOfRange (bigint key of listmodels) -> 500
    r = await client.get("/v2/models", params={"cursor": cursor([value])}, headers=admin)
    assert assert_envelope(r, 400) == "invalid cursor"


async def test_cursor_integer_at_the_bigint_edge_is_a_page(client, admin):
    r = await client.get("/v2/models", params={"cursor": cursor([2**63 - 1])}, headers=admin)
    assert r.status_code == 200 and r.json() == []


def test_cursor_decimal_postgresql_cannot_hold_is_rejected():
    column = Column("amount", Numeric())
    assert _typed(column, "12.5") == Decimal("12.5")
    for value in ("1e999999", "NaN", "Infinity", "-1e-999999"):
        with pytest.raises(BadRequest):
            _typed(column, value)


# --- tokens: correctly signed but absurd claims were a 500, not a 401 --------------------------


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
@pytest.mark.parametrize("number", ["1e400", "-1e400"])
async def test_infinite_time_claims_are_401(client, settings, claim, number):
    # was: OverflowError (int(inf)) inside python-jose -> 500
    claims = {"sub": "x", "iss": settings.jwt_issuer, "exp": int(time.time()) + 600, "scope": "streamline/admin"}
    payload = json.dumps(claims)[:-1] + f', "{claim}": {number}}}'
    r = await client.get("/v2/clients", headers=bearer(signed(settings, payload)))
    assert_envelope(r, 401)
    assert r.headers["www-authenticate"] == "Bearer"


async def test_deeply_nested_claims_are_401(client, settings):
    # was: RecursionError while decoding the claims -> 500
    payload = '{"sub": "x", "deep": ' + '{"a": ' * 100_000 + "1" + "}" * 100_000 + "}"
    r = await client.get("/v2/clients", headers=bearer(signed(settings, payload)))
    assert_envelope(r, 401)


@pytest.mark.parametrize(
    "claims",
    [
        {"client_id": "a\u0000", "scope": "streamline/read_domains streamline/read_models"},
        {"client_id": "\udc00", "scope": "streamline/read_domains streamline/read_models"},
    ],
)
async def test_unusable_tenant_names_in_a_token_are_ignored(client, admin, settings, claims):
    # was: the tenant filter sent NUL / surrogates to PostgreSQL -> 500 on listclients / listjobs
    assert (await client.post("/v2/clients", json={"client_id": "c1", "name": "C"}, headers=admin)).status_code == 201
    base = {"sub": "x", "iss": settings.jwt_issuer, "exp": int(time.time()) + 600}
    headers = bearer(signed(settings, json.dumps({**base, **claims})))
    for path in ("/v2/clients", "/v2/jobs"):
        r = await client.get(path, headers=headers)
        assert r.status_code == 200 and r.json() == [], r.text


@pytest.mark.parametrize("group", ["client:\u0000x", "client:\ud800"])
async def test_unusable_tenant_groups_make_the_token_invalid(client, admin, settings, group):
    # was: the tenant filter sent NUL / surrogates to PostgreSQL -> 500; then: the group was
    # ignored but still granted its permissions (a platform caller); now (spec 15.5): 401
    assert (await client.post("/v2/clients", json={"client_id": "c1", "name": "C"}, headers=admin)).status_code == 201
    claims = {"sub": "x", "iss": settings.jwt_issuer, "exp": int(time.time()) + 600, "username": "human"}
    for groups in ([group], ["client:c1", group]):
        headers = bearer(signed(settings, json.dumps({**claims, "cognito:groups": groups})))
        for path in ("/v2/clients", "/v2/jobs"):
            assert_envelope(await client.get(path, headers=headers), 401)


async def test_well_formed_tenant_groups_still_grant_access(client, admin, auth):
    assert (await client.post("/v2/clients", json={"client_id": "c1", "name": "C"}, headers=admin)).status_code == 201
    r = await client.get("/v2/clients", headers=auth(groups=["client:c1", "other-group"], username="human"))
    assert [c["client_id"] for c in r.json()] == ["c1"]


# --- HEAD: answered 405 while the Allow header listed HEAD --------------------------------------


async def test_head_is_get_without_a_body(client, admin):
    assert (await client.post("/v2/clients", json={"client_id": "c1", "name": "C"}, headers=admin)).status_code == 201
    for path, headers in (("/v2/health", {}), ("/v2/clients", admin), ("/v2/clients/c1", admin)):
        got = await client.get(path, headers=headers)
        head = await client.head(path, headers=headers)
        assert head.status_code == got.status_code == 200, head.text
        assert head.content == b""
        assert head.headers["content-type"] == got.headers["content-type"]
        assert head.headers["content-length"] == got.headers["content-length"]
    assert (await client.head("/v2/clients/ghost", headers=admin)).status_code == 404
    assert (await client.head("/v2/clients")).status_code == 401


async def test_head_on_a_post_only_route_is_405_with_allow(client, admin):
    r = await client.head("/v2/models/m/new_version", headers=admin)
    assert r.status_code == 405 and r.headers["allow"] == "POST"


async def test_trailing_slash_is_an_unknown_route_not_a_redirect(client, admin):
    # was: 307 to the path without the slash, on the host the caller's Host header named
    r = await client.get("/v2/clients/", headers={**admin, "Host": "elsewhere.example"})
    assert "no route" in assert_envelope(r, 404)
    assert "location" not in r.headers


# --- body size: any size was read into memory and stored (100 MB job inputs were accepted) ------


@pytest.fixture
async def small_limit_client(engine, settings):
    app = create_app(settings.model_copy(update={"max_request_bytes": 1024}))
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        yield c


async def test_body_over_the_limit_is_413_and_nothing_is_written(small_limit_client, admin, session):
    # too large: refused before it is read or parsed (so the unknown key is never looked at)
    body = json.dumps({"client_id": "big", "name": "Big", "pad": "x" * 2000}).encode()
    r = await small_limit_client.post(
        "/v2/clients", content=body, headers={**admin, "Content-Type": "application/json"}
    )
    assert "1024 bytes" in assert_envelope(r, 413)
    assert r.headers.get("x-request-id")
    assert (await session.scalar(select(Client).where(Client.client_id == "big"))) is None


async def test_chunked_body_over_the_limit_is_413(small_limit_client, admin, session):
    async def chunks():
        yield b'{"client_id": "big", "name": "Big", "pad": "'
        for _ in range(20):
            yield b"x" * 100
        yield b'"}'

    r = await small_limit_client.post(
        "/v2/clients", content=chunks(), headers={**admin, "Content-Type": "application/json"}
    )
    assert "transfer-encoding" in r.request.headers or "content-length" not in r.request.headers
    assert_envelope(r, 413)
    assert (await session.scalar(select(Client).where(Client.client_id == "big"))) is None


async def test_body_within_the_limit_is_served(small_limit_client, admin):
    # padded with long app-client ids (unknown fields are a 400): ~950 bytes
    pad = [f"{i}" + "x" * 120 for i in range(7)]
    body = {"client_id": "small", "name": "Small", "app_client_ids": pad}
    assert 900 < len(json.dumps(body)) < 1024
    r = await small_limit_client.post("/v2/clients", json=body, headers=admin)
    assert r.status_code == 201, r.text


# --- the OpenAPI document: the statuses the routes send are documented ----------------------------

SPEC_OPERATION_IDS = {
    "listclients", "createdomain", "getdomainfeatures", "updatedomainfeatures", "initdomainservice",
    "initalldomainservices", "updatedomainservice", "upsertdomainmodelassignment", "putservicemodelassignment",
    "runservicemodelassignmentjob", "listmodels", "getmodel", "createmodel", "updatemodel", "createmodelversion",
    "setmodelversionstatus", "infermodelversion", "completemodeljob", "listmodeleventsubscriptions",
    "createmodeleventsubscription", "updatemodeleventsubscription",
}  # fmt: skip


async def test_openapi_documents_every_spec_operation_and_its_errors(client):
    doc = (await client.get("/v2/openapi.json")).json()
    operations = {
        op["operationId"]: (method, path, op)
        for path, item in doc["paths"].items()
        for method, op in item.items()
        if isinstance(op, dict) and "operationId" in op
    }
    assert set(operations) >= SPEC_OPERATION_IDS
    envelope_ref = {"$ref": "#/components/schemas/ErrorEnvelope"}
    for op_id, (method, path, op) in operations.items():
        if "requestBody" in op:
            assert op["responses"]["413"]["content"]["application/json"]["schema"] == envelope_ref, op_id
    responses = {op_id: op["responses"] for op_id, (_, _, op) in operations.items()}
    assert "409" in responses["createclient"]
    assert "404" in responses["getclient"] and "404" in responses["updateclient"]
    assert responses["getclient"]["404"]["content"]["application/json"]["schema"] == envelope_ref
    health = responses["health"]
    assert {"200", "503"} <= set(health)
    assert "ErrorEnvelope" not in json.dumps(health["503"])  # the health body, not the envelope


# --- the audit log's free-text filters (schemathesis, issue 18 closing run) ------------------------


@pytest.mark.parametrize("name", ["actor", "target_id"])
async def test_a_nul_character_in_an_audit_text_filter_is_400(client, admin, name):
    # was: PostgreSQL refuses NUL in text -> 500 (schemathesis: actor=...%00...)
    for value in ("\u0000", "alice\u0000", "caf\u00e9\u0000x"):
        r = await client.get("/v2/audit", params={name: value}, headers=admin)
        assert assert_envelope(r, 400).startswith("invalid request"), r.text
        assert name in r.json()["message"]
    r = await client.get("/v2/audit", params={name: "caf\u00e9 \U0001f600"}, headers=admin)
    assert r.status_code == 200 and r.json() == []
