"""The permission table (spec 2.3) and the tenant table (2.4): unit-tested on the claims mapping
for every row, and enforced by the routes that exist (clients)."""

from __future__ import annotations

import pytest

from pie.auth import PERMISSIONS, principal_from_claims
from pie.errors import Forbidden, Unauthorized

CLIENT_GROUP_GRANTS = {"read_models", "read_domains", "manage_domains", "init_services", "run_inference"}


# --- 2.3: each scope grants exactly its permission --------------------------------------------


@pytest.mark.parametrize("permission", [p for p in PERMISSIONS if p != "admin"])
def test_each_scope_grants_its_permission_only(permission):
    p = principal_from_claims({"sub": "m", "scope": f"streamline/{permission}"})
    assert p.has(permission)
    assert {q for q in PERMISSIONS if p.has(q)} == {permission}
    assert not p.is_admin
    p.require(permission)
    with pytest.raises(Forbidden):
        p.require("admin")


def test_admin_scope_grants_everything():
    p = principal_from_claims({"sub": "m", "scope": "streamline/admin"})
    assert p.is_admin
    assert all(p.has(q) for q in PERMISSIONS)


def test_scopes_combine():
    p = principal_from_claims({"scope": "streamline/read_models streamline/complete_jobs"})
    assert {q for q in PERMISSIONS if p.has(q)} == {"read_models", "complete_jobs"}


@pytest.mark.parametrize(
    "scope",
    ["read_models", "other/read_models", "streamline/READ_MODELS", "streamline/", "streamline/superuser", "admin"],
)
def test_unknown_or_unprefixed_scopes_grant_nothing(scope):
    p = principal_from_claims({"scope": scope})
    assert not any(p.has(q) for q in PERMISSIONS)


def test_human_admin_group_grants_everything():
    p = principal_from_claims({"sub": "h", "username": "alice", "cognito:groups": ["admin"]})
    assert p.is_admin and all(p.has(q) for q in PERMISSIONS)


def test_human_client_group_grants_the_five_tenant_permissions():
    p = principal_from_claims({"sub": "h", "username": "bob", "cognito:groups": ["client:sealink"]})
    assert {q for q in PERMISSIONS if p.has(q)} == CLIENT_GROUP_GRANTS
    for missing in ("manage_models", "complete_jobs", "admin"):
        assert not p.has(missing)
    assert not p.is_admin


@pytest.mark.parametrize("groups", [["clients:sealink"], ["Admin"], ["sealink"], [], "admin", [1, None]])
def test_other_groups_grant_nothing(groups):
    p = principal_from_claims({"username": "carol", "cognito:groups": groups})
    assert not any(p.has(q) for q in PERMISSIONS)
    assert not p.can_access("sealink")


@pytest.mark.parametrize("group", ["client:", "client: sealink", "client:-x", "client:" + "x" * 129])
def test_a_client_group_without_a_valid_client_id_makes_the_token_invalid(group):
    """Spec 15.5: it would grant the group's permissions with no tenant (a platform caller)."""
    with pytest.raises(Unauthorized, match="client id"):
        principal_from_claims({"username": "carol", "cognito:groups": ["client:sealink", group]})


def test_no_claims_grant_nothing():
    p = principal_from_claims({})
    assert not any(p.has(q) for q in PERMISSIONS) and not p.can_access("x") and not p.is_admin


# --- 2.4: tenant access ---------------------------------------------------------------------------


def test_tenant_human_admin_group_any_client():
    p = principal_from_claims({"username": "alice", "cognito:groups": ["admin"]})
    assert p.can_access("sealink") and p.can_access("anyone")


def test_tenant_human_client_group_only_that_client():
    p = principal_from_claims({"username": "bob", "cognito:groups": ["client:sealink"]})
    assert p.can_access("sealink")
    assert not p.can_access("other") and not p.can_access("sealink2") and not p.can_access(None)
    p.require_tenant("sealink")
    with pytest.raises(Forbidden):
        p.require_tenant("other")


def test_tenant_human_in_two_client_groups():
    p = principal_from_claims({"username": "bob", "cognito:groups": ["client:a", "client:b"]})
    assert p.can_access("a") and p.can_access("b") and not p.can_access("c")


def test_tenant_machine_token_client_id_claim():
    p = principal_from_claims({"sub": "m", "client_id": "sealink", "scope": "streamline/run_inference"})
    assert p.can_access("sealink") and not p.can_access("other")


def test_tenant_human_token_client_id_is_the_app_not_a_tenant():
    p = principal_from_claims({"username": "dave", "client_id": "sealink", "cognito:groups": ["client:other"]})
    assert not p.can_access("sealink") and p.can_access("other")


def test_tenant_machine_admin_scope_any_client():
    p = principal_from_claims({"sub": "m", "client_id": "platform", "scope": "streamline/admin"})
    assert p.can_access("sealink") and p.can_access("platform")


# --- the same tables through real routes ---------------------------------------------------------


@pytest.fixture
async def two_clients(client, admin):
    for cid in ("sealink", "other"):
        r = await client.post("/v2/clients", json={"client_id": cid, "name": cid.title()}, headers=admin)
        assert r.status_code == 201, r.text


async def ids(r) -> list[str]:
    assert r.status_code == 200, r.text
    return [c["client_id"] for c in r.json()]


CALLERS = {
    "machine admin scope": dict(admin=True),
    "human admin group": dict(username="alice", groups=["admin"]),
    "machine sealink read_domains": dict(scopes=["read_domains"], client_id="sealink"),
    "human client:sealink": dict(username="bob", groups=["client:sealink"]),
}


@pytest.mark.parametrize("caller", CALLERS)
async def test_routes_enforce_tenant_table(client, auth, two_clients, caller):
    headers = auth(**CALLERS[caller])
    is_admin = "admin" in caller
    assert await ids(await client.get("/v2/clients", headers=headers)) == (
        ["other", "sealink"] if is_admin else ["sealink"]
    )
    assert (await client.get("/v2/clients/sealink", headers=headers)).status_code == 200
    r = await client.get("/v2/clients/other", headers=headers)
    assert r.status_code == (200 if is_admin else 403)
    if not is_admin:
        assert r.json() == {"success": False, "message": "no access to client other"}
    # client management is admin only
    r = await client.post("/v2/clients", json={"client_id": f"new-{len(caller)}", "name": "N"}, headers=headers)
    assert r.status_code == (201 if is_admin else 403)
    r = await client.patch("/v2/clients/sealink", json={"name": "Renamed"}, headers=headers)
    assert r.status_code == (200 if is_admin else 403)


@pytest.mark.parametrize(
    "scope", ["read_models", "manage_models", "manage_domains", "init_services", "run_inference", "complete_jobs"]
)
async def test_scopes_without_read_domains_cannot_read_clients(client, auth, two_clients, scope):
    headers = auth(scopes=[scope], client_id="sealink")
    r = await client.get("/v2/clients", headers=headers)
    assert r.status_code == 403 and r.json()["message"] == "missing permission read_domains"
    # permission is checked before tenant access and existence
    assert (await client.get("/v2/clients/sealink", headers=headers)).status_code == 403
    assert (await client.get("/v2/clients/ghost", headers=headers)).status_code == 403


async def test_machine_token_without_tenant_sees_no_clients(client, auth, two_clients):
    headers = auth(scopes=["read_domains"])
    assert await ids(await client.get("/v2/clients", headers=headers)) == []
    assert (await client.get("/v2/clients/sealink", headers=headers)).status_code == 403


async def test_unknown_client_is_404_only_for_callers_with_access(client, auth, admin, two_clients):
    r = await client.get("/v2/clients/ghost", headers=admin)
    assert r.status_code == 404 and r.json() == {"success": False, "message": "client ghost not found"}
    # a caller who may address "ghost" learns it does not exist; anyone else gets 403
    assert (
        await client.get("/v2/clients/ghost", headers=auth(username="e", groups=["client:ghost"]))
    ).status_code == 404
    assert (
        await client.get("/v2/clients/ghost", headers=auth(scopes=["read_domains"], client_id="sealink"))
    ).status_code == 403
    r = await client.patch("/v2/clients/ghost", json={"name": "x"}, headers=admin)
    assert r.status_code == 404


async def test_human_client_group_has_no_client_management_even_for_own_client(client, auth, two_clients):
    headers = auth(username="bob", groups=["client:sealink"])
    r = await client.patch("/v2/clients/sealink", json={"status": "suspended"}, headers=headers)
    assert r.status_code == 403 and r.json()["message"] == "missing permission admin"
