"""The route x permission x tenant matrix (spec 2.3 / 2.4), over EVERY operation of the app's
OpenAPI document, so a new route cannot be added without a row in ``REQUIRED`` below.

Each test arranges one world through the API (admin token): tenant ``tenant-a`` with model
``pricing-model`` version 1 (in-process handlers, active), domain ``south_australia`` with the
example features, an active ``default`` domain assignment, service ``svc-1`` (its init job is
the job addressed by the job routes) with a service-scope ``default`` assignment, and an event
subscription on the model; tenant ``tenant-b`` with its own domain, service and job.

Every call sends a valid body where one is required, so the outcome observed is the auth
outcome, not a 400. (What happens to a missing or malformed body without a token is pinned in
``test_no_token_is_401_whatever_the_body``.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from factories import (
    IN_PROCESS_HANDLERS,
    assign,
    create_domain,
    init_service,
    make_client,
    seven_features,
    tenant_setup,
)

A, B = "tenant-a", "tenant-b"
DOMAIN = "south_australia"
ROUTE = {"route": "Adelaide to Sydney"}

ALL_PERMISSIONS = (
    "read_models",
    "manage_models",
    "read_domains",
    "manage_domains",
    "init_services",
    "run_inference",
    "complete_jobs",
    "admin",
)
# spec 2.3: what a human in a `client:{id}` group gets
CLIENT_GROUP_GRANTS = {"read_models", "read_domains", "manage_domains", "init_services", "run_inference"}

# operation id -> the permission(s) spec 2.3 says it needs (a set: ANY one of them suffices).
# "read models, versions, event subscriptions, jobs" = read_models; "run assignment jobs and
# direct inference; read jobs" = run_inference; "read clients (own), domains, features,
# services, assignments" = read_domains; client management = admin.
REQUIRED: dict[str, frozenset[str]] = {
    # 4. clients
    "listclients": frozenset({"read_domains"}),
    "createclient": frozenset({"admin"}),
    "getclient": frozenset({"read_domains"}),
    "updateclient": frozenset({"admin"}),
    # 5. domains, features, services
    "createdomain": frozenset({"manage_domains"}),
    "listdomains": frozenset({"read_domains"}),
    "getdomain": frozenset({"read_domains"}),
    "updatedomain": frozenset({"manage_domains"}),
    "getdomainfeatures": frozenset({"read_domains"}),
    "updatedomainfeatures": frozenset({"manage_domains"}),
    "getdomaincontract": frozenset({"read_domains"}),
    "initdomainservice": frozenset({"init_services"}),
    "listdomainservices": frozenset({"read_domains"}),
    "initalldomainservices": frozenset({"init_services"}),
    "getdomainservice": frozenset({"read_domains"}),
    "updatedomainservice": frozenset({"init_services"}),
    # 6. assignments
    "upsertdomainmodelassignment": frozenset({"manage_domains"}),
    "listdomainmodelassignments": frozenset({"read_domains"}),
    "putdomainmodelassignment": frozenset({"manage_domains"}),
    "getdomainmodelassignment": frozenset({"read_domains"}),
    "listdomainmodelassignmentrevisions": frozenset({"read_domains"}),
    "getdomainmodelassignmentarms": frozenset({"read_domains"}),
    "rundomainmodelassignmentjob": frozenset({"run_inference"}),
    "upsertservicemodelassignment": frozenset({"manage_domains"}),
    "listservicemodelassignments": frozenset({"read_domains"}),
    "putservicemodelassignment": frozenset({"manage_domains"}),
    "getservicemodelassignment": frozenset({"read_domains"}),
    "listservicemodelassignmentrevisions": frozenset({"read_domains"}),
    "getservicemodelassignmentarms": frozenset({"read_domains"}),
    "runservicemodelassignmentjob": frozenset({"run_inference"}),
    # 7. registry
    "listmodels": frozenset({"read_models"}),
    "createmodel": frozenset({"manage_models"}),
    "getmodel": frozenset({"read_models"}),
    "updatemodel": frozenset({"manage_models"}),
    "createmodelversion": frozenset({"manage_models"}),
    "listmodelversions": frozenset({"read_models"}),
    "getmodelversion": frozenset({"read_models"}),
    "setmodelversionstatus": frozenset({"manage_models"}),
    "infermodelversion": frozenset({"run_inference"}),
    # 8. event subscriptions
    "listmodeleventsubscriptions": frozenset({"read_models"}),
    "createmodeleventsubscription": frozenset({"manage_models"}),
    "getmodeleventsubscription": frozenset({"read_models"}),
    "updatemodeleventsubscription": frozenset({"manage_models"}),
    "deletemodeleventsubscription": frozenset({"manage_models"}),
    # 9. jobs
    "getjob": frozenset({"read_models", "run_inference"}),
    "listjobs": frozenset({"read_models", "run_inference"}),
    "completemodeljob": frozenset({"complete_jobs"}),
    # 15.4 lifecycle: cancel and retry need what launches the job (the world's job is a
    # service's init job: run_inference or init_services); one service's re-init and delete
    # are service management
    "canceljob": frozenset({"run_inference", "init_services"}),
    "retryjob": frozenset({"run_inference", "init_services"}),
    "reinitdomainservice": frozenset({"init_services"}),
    "deletedomainservice": frozenset({"init_services"}),
    # 9.3 the in-process handler names are part of the model registry
    "listinprocesshandlers": frozenset({"read_models"}),
    # 14.6 audit: the version status history is registry data; the audit log is tenant data
    # (admins: every row; tenant readers: their clients' rows)
    "listmodelversionstatushistory": frozenset({"read_models"}),
    "listauditrecords": frozenset({"read_domains"}),
    # 15.6 webhooks: a tenant's need manage_domains on it; the platform's are for admins
    "createwebhook": frozenset({"manage_domains"}),
    "listwebhooks": frozenset({"manage_domains"}),
    "getwebhook": frozenset({"manage_domains"}),
    "updatewebhook": frozenset({"manage_domains"}),
    "deletewebhook": frozenset({"manage_domains"}),
    "rotatewebhooksecret": frozenset({"manage_domains"}),
    "listwebhookdeliveries": frozenset({"manage_domains"}),
    "testwebhook": frozenset({"manage_domains"}),
    "createplatformwebhook": frozenset({"admin"}),
    "listplatformwebhooks": frozenset({"admin"}),
    "getplatformwebhook": frozenset({"admin"}),
    "updateplatformwebhook": frozenset({"admin"}),
    "deleteplatformwebhook": frozenset({"admin"}),
    "rotateplatformwebhooksecret": frozenset({"admin"}),
    "listplatformwebhookdeliveries": frozenset({"admin"}),
    "testplatformwebhook": frozenset({"admin"}),
}
PUBLIC = {"health", "healthlive", "healthready"}

SUBSCRIPTION_BODY = {
    "trigger_event": "training_complete",
    "target_model_id": "pricing-model",
    "target_action": "inference",
    "input_source": "stored",
    "input": ROUTE,
}
ASSIGNMENT = {"model_id": "pricing-model", "model_version": "1"}

# a valid body for every operation that takes one (operations creating records get fresh ids
# or generated ids, so repeating the call is at worst a 409, never a 400)
BODIES: dict[str, Any] = {
    "createclient": {"client_id": "tenant-new", "name": "New"},
    "updateclient": {"name": "Tenant A"},
    "createdomain": {"name": "generated id"},
    "updatedomain": {"name": "South Australia"},
    "updatedomainfeatures": {"features": seven_features()},
    "initdomainservice": {"service_id": "svc-new", "static_features": ROUTE},
    "updatedomainservice": {"static_features": {"competitor_count": 3}},
    "upsertdomainmodelassignment": {"assignment_key": "default", **ASSIGNMENT},
    "putdomainmodelassignment": ASSIGNMENT,
    "rundomainmodelassignmentjob": {"input": {}},
    "upsertservicemodelassignment": {"assignment_key": "default", **ASSIGNMENT},
    "putservicemodelassignment": ASSIGNMENT,
    "runservicemodelassignmentjob": {"input": {}},
    "createmodel": {"name": "another", "description": "d", "handlers": IN_PROCESS_HANDLERS},
    "updatemodel": {"name": "pricing-model", "description": "d", "handlers": IN_PROCESS_HANDLERS},
    "createmodelversion": {},
    "setmodelversionstatus": {"status": "active"},
    "infermodelversion": {"input": ROUTE},
    "createmodeleventsubscription": SUBSCRIPTION_BODY,
    "updatemodeleventsubscription": {"label": "relabelled"},
    "completemodeljob": {"status": "success", "output": {"price": 1}},
    "createwebhook": {"url": "https://93.184.216.34/hook", "events": ["job.succeeded"]},
    "updatewebhook": {"description": "relabelled"},
    "createplatformwebhook": {"url": "https://93.184.216.34/hook", "events": ["version.status_changed"]},
    "updateplatformwebhook": {"description": "relabelled"},
}


@dataclass(frozen=True)
class Op:
    op_id: str
    method: str
    template: str
    has_body: bool

    @property
    def tenant_route(self) -> bool:
        return self.template.startswith("/v2/clients/{client_id}")


def operations(app) -> list[Op]:
    ops = []
    for path, methods in app.openapi()["paths"].items():
        for method, spec in methods.items():
            ops.append(Op(spec["operationId"], method.upper(), path, "requestBody" in spec))
    return ops


@dataclass
class World:
    params: dict[str, str]  # path parameter values (tenant A)
    a_job: str
    b_job: str

    def url(self, op: Op, **override: str) -> str:
        values = {**self.params, **override}
        if op.template.startswith("/v2/webhooks/"):  # the platform's routes address the platform's webhook
            values["webhook_id"] = values["platform_webhook_id"]
        return re.sub(r"\{(\w+)\}", lambda m: values[m.group(1)], op.template)


async def call(
    http: httpx.AsyncClient, op: Op, world: World, headers: dict[str, str], **override: str
) -> httpx.Response:
    kwargs: dict[str, Any] = {"headers": headers}
    if op.op_id in BODIES:
        kwargs["json"] = BODIES[op.op_id]
    return await http.request(op.method, world.url(op, **override), **kwargs)


@pytest.fixture
async def world(client, session, admin) -> World:
    await tenant_setup(client, session, admin, client_id=A, domain_id=DOMAIN)
    a_job = (await init_service(client, admin, "svc-1", ROUTE, client_id=A, domain_id=DOMAIN)).json()["job_id"]
    await assign(client, admin, A, DOMAIN, service_id="svc-1")
    r = await client.post("/v2/models/pricing-model/event-subscriptions", json=SUBSCRIPTION_BODY, headers=admin)
    assert r.status_code == 201, r.text
    subscription_id = r.json()["id"]
    await make_client(session, B)
    await create_domain(client, admin, B, DOMAIN)
    await assign(client, admin, B, DOMAIN)
    b_job = (await init_service(client, admin, "svc-b", ROUTE, client_id=B, domain_id=DOMAIN)).json()["job_id"]
    r = await client.post(f"/v2/clients/{A}/webhooks", json=BODIES["createwebhook"], headers=admin)
    assert r.status_code == 201, r.text
    platform = await client.post("/v2/webhooks", json=BODIES["createplatformwebhook"], headers=admin)
    assert platform.status_code == 201, platform.text
    params = {
        "webhook_id": r.json()["id"],
        "platform_webhook_id": platform.json()["id"],
        "client_id": A,
        "domain_id": DOMAIN,
        "service_id": "svc-1",
        "assignment_key": "default",
        "model_id": "pricing-model",
        "model_version": "1",
        "subscription_id": subscription_id,
        "job_id": a_job,
    }
    return World(params, a_job, b_job)


def machine(auth, perms, client_id: str | None = A) -> dict[str, str]:
    """A machine token with exactly ``perms`` (scopes) and a ``client_id`` claim."""
    return auth(scopes=sorted(perms), client_id=client_id, username=None) if perms else auth(client_id=client_id)


def allowed(r: httpx.Response) -> bool:
    """Past authorization: not 401/403, and (the bodies being valid) not a 400 or a 5xx."""
    return r.status_code not in (400, 401, 403) and r.status_code < 500


def denied(r: httpx.Response) -> bool:
    return r.status_code == 403 and r.json().get("success") is False and bool(r.json().get("message"))


def report(failures: list[str]) -> None:
    assert not failures, f"{len(failures)} discrepancies:\n" + "\n".join(failures)


# ---------------------------------------------------------------------------------------------


def test_every_operation_has_a_permission_row(app):
    """The table is the spec: an operation missing from it (or a stale row) fails here."""
    ids = [op.op_id for op in operations(app)]
    assert len(ids) == len(set(ids)), "duplicate operation ids"
    assert set(ids) - PUBLIC == set(REQUIRED), (
        f"missing rows: {sorted(set(ids) - PUBLIC - set(REQUIRED))}; stale rows: {sorted(set(REQUIRED) - set(ids))}"
    )
    assert all(perms <= set(ALL_PERMISSIONS) for perms in REQUIRED.values())
    with_body = {op.op_id for op in operations(app) if op.has_body}
    assert with_body == set(BODIES), "every operation taking a body has a valid one here"


async def test_no_token_is_401_whatever_the_body(app, client, world):
    failures = []
    for op in operations(app):
        if op.op_id in PUBLIC:
            r = await call(client, op, world, {})
            assert r.status_code == 200, r.text
            continue
        attempts = {"valid body": await call(client, op, world, {})}
        if op.has_body:
            # no body at all, and a body of the wrong shape: the missing token still comes first
            attempts["no body"] = await client.request(op.method, world.url(op))
            attempts["wrong body"] = await client.request(op.method, world.url(op), json={"unexpected": [1]})
            # FastAPI parses JSON before running dependencies: malformed JSON must not mask the 401
            malformed = {"content": b'{"not json', "headers": {"content-type": "application/json"}}
            attempts["malformed JSON"] = await client.request(op.method, world.url(op), **malformed)
            attempts["malformed JSON, garbage token"] = await client.request(
                op.method,
                world.url(op),
                content=b"{",
                headers={"content-type": "application/json", "Authorization": "Bearer x.y.z"},
            )
        attempts["wrong scheme"] = await call(client, op, world, {"Authorization": "Basic YTpi"})
        attempts["garbage token"] = await call(client, op, world, {"Authorization": "Bearer not.a.jwt"})
        for label, r in attempts.items():
            ok = (
                r.status_code == 401
                and r.headers.get("www-authenticate", "").startswith("Bearer")
                and r.json().get("success") is False
                and r.json().get("message")
            )
            if not ok:
                failures.append(f"{op.method} {op.template} ({op.op_id}) {label}: {r.status_code} {r.text[:120]}")
    report(failures)


async def test_malformed_json_with_a_valid_token_is_still_400(client, admin, world):
    r = await client.post("/v2/models", content=b'{"name": ', headers={"content-type": "application/json", **admin})
    assert r.status_code == 400 and r.json() == {"success": False, "message": "invalid request: malformed JSON body"}
    r = await client.post(
        f"/v2/clients/{A}/domains", content=b"{", headers={"content-type": "application/json", **admin}
    )
    assert r.status_code == 400 and r.json()["message"] == "invalid request: malformed JSON body"


async def test_permission_matrix(app, client, auth, world):
    """Every permission except the required one(s) -> 403; exactly one required permission
    (with tenant access through the client_id claim) -> past authorization."""
    failures = []
    for op in operations(app):
        if op.op_id in PUBLIC:
            continue
        needed = REQUIRED[op.op_id]
        # the admin scope grants everything, so "every permission but" never includes it
        r = await call(client, op, world, machine(auth, set(ALL_PERMISSIONS) - needed - {"admin"}))
        if not denied(r):
            failures.append(f"{op.op_id}: all but {sorted(needed)} -> {r.status_code} {r.text[:120]}")
        # nothing at all (a valid token with no scope)
        r = await call(client, op, world, machine(auth, set()))
        if not denied(r):
            failures.append(f"{op.op_id}: no permission -> {r.status_code} {r.text[:120]}")
    for op in operations(app):
        if op.op_id in PUBLIC:
            continue
        for perm in sorted(REQUIRED[op.op_id]):
            r = await call(client, op, world, machine(auth, {perm}))
            if not allowed(r):
                failures.append(f"{op.op_id}: only {perm} -> {r.status_code} {r.text[:160]}")
    report(failures)


async def test_tenant_matrix(app, client, auth, world):
    """2.4 on every /v2/clients/{client_id} route, and 2.3's human client group on every route."""
    tenant_ops = [op for op in operations(app) if op.tenant_route]
    assert len(tenant_ops) >= 25
    every_scope = set(ALL_PERMISSIONS) - {"admin"}
    outsiders = {
        "machine token of tenant-b (all scopes)": machine(auth, every_scope, client_id=B),
        "machine token without client_id (all scopes)": machine(auth, every_scope, client_id=None),
        "human in client:tenant-b": auth(username="bob", groups=[f"client:{B}"]),
    }
    failures = []
    for op in tenant_ops:
        for who, headers in outsiders.items():
            r = await call(client, op, world, headers)
            if not denied(r):
                failures.append(f"{op.op_id}: {who} -> {r.status_code} {r.text[:120]}")
            elif op.op_id not in ("createclient", "updateclient") and r.json()["message"] != f"no access to client {A}":
                failures.append(f"{op.op_id}: {who} -> 403 for another reason: {r.json()['message']}")
    human_a = auth(username="alice", groups=[f"client:{A}"])
    for op in operations(app):
        if op.op_id in PUBLIC:
            continue
        r = await call(client, op, world, human_a)
        expect_allowed = bool(REQUIRED[op.op_id] & CLIENT_GROUP_GRANTS)
        if expect_allowed != allowed(r) or (not expect_allowed and not denied(r)):
            want = "allowed" if expect_allowed else "403"
            failures.append(f"{op.op_id}: human in client:{A} -> {r.status_code} (want {want}) {r.text[:120]}")
    insiders = {
        "human in admin group": auth(username="root", groups=["admin"]),
        "machine token with streamline/admin": auth(scopes=["admin"], client_id="platform", username=None),
    }
    for op in tenant_ops:
        for who, headers in insiders.items():
            r = await call(client, op, world, headers)
            if not allowed(r):
                failures.append(f"{op.op_id}: {who} -> {r.status_code} {r.text[:120]}")
    report(failures)


async def test_human_client_group_outcomes(client, auth, world):
    """Spot checks a user would notice: the tenant human cannot register models or complete
    jobs, but initializes services and runs jobs in their tenant."""
    human_a = auth(username="alice", groups=[f"client:{A}"])
    r = await client.post("/v2/models", json=BODIES["createmodel"], headers=human_a)
    assert r.status_code == 403 and r.json() == {"success": False, "message": "missing permission manage_models"}
    r = await client.post(
        f"/v2/clients/{A}/domains/{DOMAIN}/service/init",
        json={"service_id": "svc-h", "static_features": ROUTE},
        headers=human_a,
    )
    assert r.status_code == 202, r.text
    r = await client.get(f"/v2/jobs/{r.json()['job_id']}", headers=human_a)
    assert r.status_code == 200 and r.json()["client_id"] == A
    r = await client.post(
        f"/v2/models/pricing-model/versions/1/jobs/{world.a_job}/complete", json={"status": "success"}, headers=human_a
    )
    assert r.status_code == 403
    r = await client.post("/v2/clients", json={"client_id": "x", "name": "X"}, headers=human_a)
    assert r.status_code == 403


async def test_jobs_are_tenant_scoped(client, auth, session, world):
    b_machine = machine(auth, {"read_models", "run_inference", "complete_jobs"}, client_id=B)
    b_human = auth(username="bob", groups=[f"client:{B}"])
    a_complete = f"/v2/models/pricing-model/versions/1/jobs/{world.a_job}/complete"
    for headers in (b_machine, b_human):
        r = await client.get(f"/v2/jobs/{world.a_job}", headers=headers)
        assert r.status_code == 403 and r.json() == {"success": False, "message": f"no access to client {A}"}
        r = await client.get(f"/v2/jobs/{world.a_job}?wait=1", headers=headers)
        assert r.status_code == 403
        listed = await client.get("/v2/jobs", headers=headers)
        assert listed.status_code == 200
        assert [j["job_id"] for j in listed.json()] == [world.b_job]  # their own, never tenant A's
        for query in (f"client_id={A}", f"domain_id={DOMAIN}", "model_id=pricing-model", "service_id=svc-1"):
            r = await client.get(f"/v2/jobs?{query}", headers=headers)
            if query.startswith("client_id"):
                assert r.status_code == 403
            else:
                assert r.status_code == 200 and world.a_job not in [j["job_id"] for j in r.json()], query
        r = await client.get(f"/v2/jobs/{world.b_job}", headers=headers)
        assert r.status_code == 200 and r.json()["client_id"] == B
    r = await client.post(a_complete, json={"status": "failure", "error": {"by": "tenant-b"}}, headers=b_machine)
    assert r.status_code == 403 and r.json() == {"success": False, "message": f"no access to client {A}"}
    # nothing was recorded: tenant A still sees its job pending and its service initializing
    a_reader = machine(auth, {"read_models"}, client_id=A)
    r = await client.get(f"/v2/jobs/{world.a_job}", headers=a_reader)
    assert r.status_code == 200 and r.json()["status"] == "pending" and r.json()["error"] is None
    r = await client.get(f"/v2/clients/{A}/domains/{DOMAIN}/service/svc-1", headers=machine(auth, {"read_domains"}))
    assert r.status_code == 200 and r.json()["status"] == "initializing"
    # the owning tenant's handler completes it
    r = await client.post(
        a_complete, json={"status": "success", "output": {}}, headers=machine(auth, {"complete_jobs"})
    )
    assert r.status_code == 200 and r.json()["status"] == "success"
    # and the A-side listing shows A's job, not B's
    r = await client.get("/v2/jobs", headers=a_reader)
    assert world.a_job in [j["job_id"] for j in r.json()] and world.b_job not in [j["job_id"] for j in r.json()]


async def test_replay_subscriptions_are_tenant_scoped(client, auth, admin, world):
    """A `subscribe: true` assignment job stores a replay subscription carrying tenant A's
    input: tenant B's model readers and managers neither see nor change it."""
    r = await client.post(
        f"/v2/clients/{A}/domains/{DOMAIN}/assignments/default/jobs",
        json={"input": {"secret": "tenant-a"}, "subscribe": True},
        headers=admin,
    )
    assert r.status_code == 202, r.text
    subs = (await client.get("/v2/models/pricing-model/event-subscriptions", headers=admin)).json()
    replay = [s for s in subs if s.get("client_id") == A]
    assert len(replay) == 1
    sub_url = f"/v2/models/pricing-model/event-subscriptions/{replay[0]['id']}"
    b_all = machine(auth, set(ALL_PERMISSIONS) - {"admin"}, client_id=B)
    listed = await client.get("/v2/models/pricing-model/event-subscriptions", headers=b_all)
    assert listed.status_code == 200 and replay[0]["id"] not in [s["id"] for s in listed.json()]
    assert (await client.get(sub_url, headers=b_all)).status_code in (403, 404)
    assert (await client.put(sub_url, json={"status": "paused"}, headers=b_all)).status_code in (403, 404)
    assert (await client.delete(sub_url, headers=b_all)).status_code in (403, 404)
    r = await client.get(sub_url, headers=machine(auth, {"read_models"}, client_id=A))
    assert r.status_code == 200 and r.json()["status"] == "active" and r.json()["input"] == {"secret": "tenant-a"}
