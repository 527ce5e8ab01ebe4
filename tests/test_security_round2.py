"""Security rules of spec 15.5 (issue 18, items 1, 2, 4, 5 and 6), through HTTP on PostgreSQL:

1. an ``Idempotency-Key`` replay is served only after the request's own authentication and
   authorization pass;
2. a ``client:`` group whose id is not a valid client id makes the token invalid (401), on the
   routes and on the fast read and write paths;
4. callback tokens obey the claim rules of API tokens (numeric ``exp``/``nbf``/``iat``);
5. ``app_client_ids`` and client ids are one namespace (409 either way);
6. a repeated key in one JSON object is a 400 naming it (route and fast path); ``name``/``label``
   at most 200 characters, ``description`` at most 10,000.

Item 3 (key retirement in every process) is in ``test_key_retirement.py``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import pytest
from factories import make_client, make_version
from jose import jwt
from sqlalchemy import text

from pie import callbacks, db
from pie.auth import signing_keys
from pie.jobs.logic import create_job
from pie.jobs.payload import callback_token_ttl
from pie.tables.registry import ModelVersion

INFER = "/v2/models/pricing-model/versions/1/inference"
ECHO = {"type": "in_process", "value": "echo"}
HANDLERS = {"training": ECHO, "inference": ECHO}


def idem() -> dict[str, str]:
    return {"Idempotency-Key": str(uuid.uuid4())}


async def count(session, table: str, where: str = "TRUE") -> int:
    return (await session.execute(text(f"SELECT count(*) FROM {table} WHERE {where}"))).scalar_one()


def human(auth, *groups: str, sub: str = "alice") -> dict[str, str]:
    return auth(groups=list(groups), username=sub, subject=sub)


# ---- 1. idempotency replay after authorization ---------------------------------------------------


@pytest.fixture
async def two_tenants(session):
    await make_client(session, "client-a")
    await make_client(session, "client-b")
    await make_version(session)


async def test_a_user_moved_to_another_tenant_gets_403_not_the_replay(client, session, auth, two_tenants):
    key = idem()
    body = {"domain_id": "d1", "name": "D1", "features": []}
    first = await client.post(
        "/v2/clients/client-a/domains", json=body, headers={**human(auth, "client:client-a"), **key}
    )
    assert first.status_code == 201, first.text
    # the same person (same issuer and subject), now in client:client-b only: the same request
    moved = human(auth, "client:client-b")
    again = await client.post("/v2/clients/client-a/domains", json=body, headers={**moved, **key})
    assert again.status_code == 403, again.text
    assert "idempotent-replayed" not in again.headers
    assert again.json() == {"success": False, "message": "no access to client client-a"}
    # back in client:client-a, the retry replays as before (nothing was consumed by the 403)
    back = await client.post(
        "/v2/clients/client-a/domains", json=body, headers={**human(auth, "client:client-a"), **key}
    )
    assert (back.status_code, back.content) == (201, first.content)
    assert back.headers["idempotent-replayed"] == "true"
    assert await count(session, "domains") == 1


async def test_a_demoted_admin_gets_403_not_the_replay(client, session, auth, two_tenants):
    key = idem()
    body = {"client_id": "client-c", "name": "C"}
    first = await client.post("/v2/clients", json=body, headers={**human(auth, "admin", sub="bob"), **key})
    assert first.status_code == 201, first.text
    demoted = await client.post("/v2/clients", json=body, headers={**human(auth, "client:client-a", sub="bob"), **key})
    assert demoted.status_code == 403 and "idempotent-replayed" not in demoted.headers
    assert "admin" in demoted.json()["message"]


async def test_a_token_with_fewer_scopes_gets_403_not_the_replay(client, session, auth, two_tenants):
    key = idem()
    body = {"id": "m2", "name": "m2", "description": "", "handlers": HANDLERS}
    writer = auth(scopes=["manage_models", "read_models"], client_id="ci-pipeline", subject="ci-pipeline")
    first = await client.post("/v2/models", json=body, headers={**writer, **key})
    assert first.status_code == 201, first.text
    reader = auth(scopes=["read_models"], client_id="ci-pipeline", subject="ci-pipeline")
    r = await client.post("/v2/models", json=body, headers={**reader, **key})
    assert r.status_code == 403 and "manage_models" in r.json()["message"]
    # an expired token of the same caller: 401
    expired = auth(scopes=["manage_models"], client_id="ci-pipeline", subject="ci-pipeline", ttl=-60)
    r = await client.post("/v2/models", json=body, headers={**expired, **key})
    assert r.status_code == 401 and "idempotent-replayed" not in r.headers


@pytest.mark.parametrize("named", [True, False], ids=["client_id-in-body", "implied-tenant"])
async def test_a_direct_inference_replay_needs_access_to_the_jobs_tenant(client, session, auth, two_tenants, named):
    """The job's tenant comes from the body (``client_id``) or from the caller's only tenant: a
    caller who lost access to it gets the 403, not the job id of that tenant."""
    key = idem()
    body = {"input": {"x": 1}, **({"client_id": "client-a"} if named else {})}
    first = await client.post(INFER, json=body, headers={**human(auth, "client:client-a"), **key})
    assert first.status_code == 202, first.text
    job_id = first.json()["inference_job_id"]
    assert await session.scalar(text("SELECT client_id FROM jobs WHERE job_id = :j"), {"j": job_id}) == "client-a"
    r = await client.post(INFER, json=body, headers={**human(auth, "client:client-b"), **key})
    assert r.status_code == 403, r.text
    assert job_id not in r.text and r.json()["message"] == "no access to client client-a"
    assert await count(session, "jobs", "job_type = 'inference'") == 1
    r = await client.post(INFER, json=body, headers={**human(auth, "client:client-a"), **key})
    assert (
        r.status_code == 202 and r.json()["inference_job_id"] == job_id and r.headers["idempotent-replayed"] == "true"
    )


async def test_authorization_comes_before_anything_about_the_key(client, session, auth, two_tenants):
    """A caller who may not make the request gets the 403, whatever the key (even a malformed
    one); for a caller who may, a malformed key is the 400 it always was."""
    bad_key = {"Idempotency-Key": "x" * 256}
    body = {"client_id": "client-z", "name": "Z"}
    r = await client.post("/v2/clients", json=body, headers={**human(auth, "client:client-a"), **bad_key})
    assert r.status_code == 403
    r = await client.post("/v2/clients", json=body, headers={**human(auth, "admin"), **bad_key})
    assert r.status_code == 400 and "Idempotency-Key" in r.json()["message"]
    assert await count(session, "clients", "client_id = 'client-z'") == 0


async def test_concurrent_keyed_requests_still_make_one_effect(client, session, auth, two_tenants):
    headers = {**human(auth, "client:client-a"), **idem()}
    answers = await asyncio.gather(*(client.post(INFER, json={"input": {}}, headers=headers) for _ in range(6)))
    assert {r.status_code for r in answers} == {202}
    assert len({r.json()["inference_job_id"] for r in answers}) == 1
    assert await count(session, "jobs", "job_type = 'inference'") == 1


# ---- 2. client: groups with a malformed id ---------------------------------------------------------


@pytest.mark.parametrize(
    "group", ["client:bad id", "client:", "client:-leading-dash", "client:" + "x" * 129, "client:caf\u00e9"]
)
async def test_a_malformed_client_group_makes_the_token_invalid(client, session, auth, two_tenants, group):
    job = await create_job(session, job_type="inference", model_id="pricing-model", model_version="1")
    await session.commit()  # a platform job (no tenant)
    for groups in ([group], ["client:client-a", group]):
        headers = human(auth, *groups)
        for method, path, body in [
            ("GET", "/v2/jobs", None),
            ("GET", f"/v2/jobs/{job.job_id}", None),  # fast read path
            ("GET", "/v2/clients/client-a/domains", None),
            ("POST", INFER, {"input": {}}),  # fast write path
            ("POST", INFER, {"input": {}, "subscribe": False, "keyed": True}),  # the route (keyed)
        ]:
            extra = idem() if body and body.pop("keyed", False) else {}
            r = await client.request(method, path, json=body, headers={**headers, **extra})
            assert r.status_code == 401, (groups, path, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
            assert "client:" in r.json()["message"]
    assert await count(session, "jobs") == 1


async def test_other_groups_are_still_ignored(client, auth, two_tenants):
    headers = human(auth, "client:client-a", "analysts", "clients:foo", "CLIENT:x")
    assert (await client.get("/v2/clients/client-a/domains", headers=headers)).status_code == 200


# ---- 4. callback-token claim rules ------------------------------------------------------------------


async def _started_job(session, settings):
    await make_version(session, "cb", handlers={"inference": ECHO, "training": ECHO})
    job = await create_job(session, job_type="inference", model_id="cb", model_version="1", input={})
    await session.execute(
        text("UPDATE jobs SET status = 'started', attempts = 1, started_at = now() WHERE job_id = :j"),
        {"j": job.job_id},
    )
    await session.commit()
    conn = await db.connect(settings, autocommit=True)
    try:
        async with conn.transaction():
            key = await signing_keys.signing_key(conn)
    finally:
        await conn.close()
    handler = (await session.get(ModelVersion, ("cb", "1"))).handlers["inference"]
    return job, key, callbacks.mint(key, job, callback_token_ttl(settings, handler))


def _resign(token: str, key: signing_keys.Key, **changes) -> str:
    claims = {**jwt.get_unverified_claims(token), **changes}
    claims = {k: v for k, v in claims.items() if v is not None}
    return jwt.encode(claims, key.secret, algorithm="HS256", headers={"kid": key.kid})


@pytest.mark.parametrize(
    "changes",
    [
        {"exp": "9999999999"},
        {"exp": 1e400},
        {"exp": True},
        {"iat": "0"},
        {"nbf": str(int(time.time()) - 10)},
        {"nbf": int(time.time()) + 3600},
        {"iat": int(time.time()) + 3600},
        {"exp": None},
    ],
    ids=["string-exp", "infinite-exp", "bool-exp", "string-iat", "string-nbf", "future-nbf", "future-iat", "no-exp"],
)
async def test_callback_tokens_obey_the_api_claim_rules(client, session, settings, changes):
    job, key, good = await _started_job(session, settings)
    url = f"/v2/models/cb/versions/1/jobs/{job.job_id}/complete"
    bad = _resign(good, key, **changes)
    r = await client.post(url, json={"status": "success", "output": {}}, headers={"Authorization": f"Bearer {bad}"})
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"] == "Bearer"
    assert await session.scalar(text("SELECT status FROM jobs WHERE job_id = :j"), {"j": job.job_id}) == "started"
    # the well-formed token of the same job still completes it
    r = await client.post(url, json={"status": "success", "output": {}}, headers={"Authorization": f"Bearer {good}"})
    assert r.status_code == 200, r.text


# ---- 5. app_client_ids and client ids: one namespace ------------------------------------------------


async def test_app_client_ids_may_not_name_a_client(client, session, admin, two_tenants):
    r = await client.post(
        "/v2/clients", json={"client_id": "client-c", "name": "C", "app_client_ids": ["client-b"]}, headers=admin
    )
    assert r.status_code == 409, r.text
    assert "client-b" in r.json()["message"]
    assert (await client.get("/v2/clients/client-c", headers=admin)).status_code == 404  # nothing written
    r = await client.patch("/v2/clients/client-a", json={"app_client_ids": ["app-1", "client-b"]}, headers=admin)
    assert r.status_code == 409 and "client-b" in r.json()["message"]
    assert (await client.get("/v2/clients/client-a", headers=admin)).json()["app_client_ids"] == []
    # its own id too: one identifier names one thing
    r = await client.patch("/v2/clients/client-a", json={"app_client_ids": ["client-a"]}, headers=admin)
    assert r.status_code == 409 and "client-a" in r.json()["message"]
    r = await client.post(
        "/v2/clients", json={"client_id": "client-d", "name": "D", "app_client_ids": ["client-d"]}, headers=admin
    )
    assert r.status_code == 409
    assert (await client.get("/v2/clients/client-d", headers=admin)).status_code == 404


async def test_a_client_id_may_not_be_an_app_client_id(client, session, admin, auth, two_tenants):
    r = await client.patch("/v2/clients/client-a", json={"app_client_ids": ["app-x"]}, headers=admin)
    assert r.status_code == 200, r.text
    r = await client.post("/v2/clients", json={"client_id": "app-x", "name": "X"}, headers=admin)
    assert r.status_code == 409, r.text
    assert "app-x" in r.json()["message"] and "client-a" in r.json()["message"]
    assert await count(session, "clients", "client_id = 'app-x'") == 0
    # machine tokens of app-x still act for client-a only
    token = auth(scopes=["read_domains"], client_id="app-x")
    assert [c["client_id"] for c in (await client.get("/v2/clients", headers=token)).json()] == ["client-a"]
    # once released, the id is free for a client
    r = await client.patch("/v2/clients/client-a", json={"app_client_ids": []}, headers=admin)
    assert r.status_code == 200
    r = await client.post("/v2/clients", json={"client_id": "app-x", "name": "X"}, headers=admin)
    assert r.status_code == 201, r.text


async def test_racing_client_and_app_client_claims_of_one_id(client, session, admin, two_tenants):
    """A client created as ``racer`` while another request maps the app client ``racer``: the
    database decides, exactly one wins, the other is a 409."""
    for attempt in range(5):
        racer = f"racer-{attempt}"
        create, patch = await asyncio.gather(
            client.post("/v2/clients", json={"client_id": racer, "name": "R"}, headers=admin),
            client.patch("/v2/clients/client-a", json={"app_client_ids": [racer]}, headers=admin),
        )
        assert (create.status_code, patch.status_code) in ((201, 409), (409, 200)), (create.text, patch.text)
        clients = await count(session, "clients", f"client_id = '{racer}'")
        mapped = await count(session, "client_app_clients", f"app_client_id = '{racer}'")
        assert clients + mapped == 1
        await client.patch("/v2/clients/client-a", json={"app_client_ids": []}, headers=admin)


# ---- 6. repeated keys, text lengths -------------------------------------------------------------------


def raw(headers: dict[str, str]) -> dict[str, str]:
    return {**headers, "Content-Type": "application/json"}


@pytest.mark.parametrize(
    "body, repeated",
    [
        ('{"input": {"x": 1}, "input": {"x": 2}}', "input"),
        ('{"input": {"price": 1, "price": 2}}', "price"),
        ('{"input": {"deep": [{"a": 1}, {"b": 1, "b": 1}]}}', "b"),
        ('{"input": {}, "client_id": "client-a", "client_id": "client-b"}', "client_id"),
        ('{"input": {"\\u0061": 1, "a": 2}}', "a"),  # the same key, spelt differently
    ],
)
async def test_a_repeated_key_is_a_400_naming_it_on_the_fast_inference_path(
    client, session, auth, admin, two_tenants, body, repeated
):
    for headers in (admin, human(auth, "client:client-a")):
        r = await client.post(INFER, content=body, headers=raw(headers))
        assert r.status_code == 400, r.text
        assert json.dumps(repeated) in r.json()["message"], r.text
    assert await count(session, "jobs") == 0


async def test_a_repeated_key_is_a_400_on_every_json_body(client, session, admin, two_tenants):
    cases = [
        ("POST", "/v2/clients", '{"client_id": "c9", "name": "a", "name": "b"}', "name"),
        ("PATCH", "/v2/clients/client-a", '{"status": "active", "status": "suspended"}', "status"),
        (
            "POST",
            "/v2/models",
            '{"name": "m", "description": "", "handlers": {"training": {"type": "in_process", "value": "echo"},'
            ' "inference": {"type": "in_process", "value": "echo", "type": "lambda"}}}',
            "type",
        ),
        ("POST", "/v2/models/pricing-model/new_version", '{"metadata": {"k": 1, "k": 2}}', "k"),
        ("POST", "/v2/clients/client-a/domains", '{"domain_id": "d", "domain_id": "e"}', "domain_id"),
        ("POST", INFER, '{"input": {"a": 1, "a": 1}}', "a"),  # keyed: the route, not the fast path
    ]
    for method, path, body, repeated in cases:
        r = await client.request(method, path, content=body, headers={**raw(admin), **idem()})
        assert r.status_code == 400, (path, r.text)
        assert r.json()["success"] is False
        assert f"repeats the key {json.dumps(repeated)}" in r.json()["message"], (path, r.text)
    assert await count(session, "clients") == 2
    assert await count(session, "models") == 1 and await count(session, "domains") == 0
    assert await count(session, "jobs") == 0
    assert await session.scalar(text("SELECT status FROM clients WHERE client_id = 'client-a'")) == "active"


async def test_a_repeated_key_without_a_token_is_still_401(client, two_tenants):
    r = await client.post(INFER, content='{"input": {}, "input": {}}', headers={"Content-Type": "application/json"})
    assert r.status_code == 401


async def test_keys_repeated_across_objects_are_fine(client, session, admin, two_tenants):
    body = '{"input": {"a": {"a": 1}, "b": [{"a": 1}, {"a": 2}]}}'
    r = await client.post(INFER, content=body, headers=raw(admin))
    assert r.status_code == 202, r.text


def _long(n: int) -> str:
    return "n" * n


async def test_names_and_labels_are_at_most_200_characters(client, session, admin, two_tenants):
    sub = {
        "trigger_event": "training_complete",
        "target_model_id": "pricing-model",
        "target_action": "inference",
        "input_source": "stored",
        "input": {},
    }
    model = {"name": "m", "description": "", "handlers": HANDLERS}
    writes = [
        ("POST", "/v2/clients", {"client_id": "c-{n}", "name": "{text}"}, 201),
        ("PATCH", "/v2/clients/client-a", {"name": "{text}"}, 200),
        ("POST", "/v2/clients/client-a/domains", {"domain_id": "d-{n}", "name": "{text}"}, 201),
        ("PATCH", "/v2/clients/client-a/domains/d-200", {"name": "{text}"}, 200),
        ("POST", "/v2/models", {**model, "id": "m-{n}", "name": "{text}"}, 201),
        ("PUT", "/v2/models/m-200", {**model, "name": "{text}"}, 200),
        ("POST", "/v2/models/pricing-model/event-subscriptions", {**sub, "label": "{text}"}, 201),
    ]
    for n, expect_ok in ((200, True), (201, False)):
        for method, path, template, ok_status in writes:
            body = json.loads(json.dumps(template).replace("{text}", _long(n)).replace("{n}", str(n)))
            r = await client.request(method, path, json=body, headers=admin)
            if expect_ok:
                assert r.status_code == ok_status, (path, r.text)
            else:
                assert r.status_code == 400, (path, r.text)
                assert "200 characters" in r.json()["message"], (path, r.text)
    subscription = (await client.get("/v2/models/pricing-model/event-subscriptions", headers=admin)).json()[0]
    url = f"/v2/models/pricing-model/event-subscriptions/{subscription['id']}"
    assert (await client.put(url, json={"label": _long(201)}, headers=admin)).status_code == 400
    assert (await client.put(url, json={"label": _long(200)}, headers=admin)).status_code == 200
    # nothing beyond the limit was stored anywhere
    for table, column in [
        ("clients", "name"),
        ("domains", "name"),
        ("models", "name"),
        ("event_subscriptions", "label"),
    ]:
        longest = await session.scalar(text(f"SELECT max(length({column})) FROM {table}"))
        assert longest <= 200, table


async def test_descriptions_are_at_most_10000_characters(client, session, admin, two_tenants):
    model = {"name": "m", "handlers": HANDLERS}
    for n, status in ((10_000, None), (10_001, 400)):
        writes = [
            ("POST", "/v2/models", {**model, "id": f"m-{n}", "description": _long(n)}, 201),
            ("PUT", "/v2/models/pricing-model", {**model, "description": _long(n)}, 200),
            ("POST", "/v2/models/pricing-model/new_version", {"version": f"v{n}", "description": _long(n)}, 201),
        ]
        for method, path, body, ok_status in writes:
            r = await client.request(method, path, json=body, headers=admin)
            assert r.status_code == (status or ok_status), (path, r.text)
            if status:
                assert "10000 characters" in r.json()["message"], r.text
    for table in ("models", "model_versions"):
        assert await session.scalar(text(f"SELECT max(length(description)) FROM {table}")) <= 10_000


async def test_the_consoles_json_input_refuses_a_repeated_key_too(client, session, admin, make_token):
    import re

    from factories import tenant_setup

    await tenant_setup(client, session, admin, client_id="acme")
    r = await client.post("/console/login", data={"token": make_token(admin=True), "next": "/console/clients"})
    assert r.status_code == 303
    url = "/console/clients/acme/domains/south_australia/assignments/default"
    csrf = re.search(r'name="csrf_token" value="([0-9a-f]+)"', (await client.get(url)).text).group(1)
    body = '{"route": "Adelaide to Sydney", "route": "Sydney to Adelaide"}'
    r = await client.post(url + "/jobs", data={"csrf_token": csrf, "input": body})
    assert r.status_code == 400 and "repeats the key &#34;route&#34;" in r.text, r.text[-2000:]
    assert await count(session, "jobs") == 0
