"""Who may read what: the read rules of the API, declared once and used by the routes, the fast
layer (``pie.http.fast``) and the console.

Each rule is a predicate (``may_*``: the fast layer and the console ask without raising) and,
where a route refuses with a 403, the ``require_*`` that raises the route's own message. A
principal is anything with ``has``, ``can_access``, ``is_admin`` and ``tenants``
(``pie.auth.Principal``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pie.errors import Forbidden

if TYPE_CHECKING:
    from pie.auth import Principal

# reading jobs (spec 14.1): either of these permissions
JOB_READ_PERMISSIONS = ("read_models", "run_inference")
# reading a tenant's domains, services and assignments
TENANT_READ_PERMISSION = "read_domains"
# launching direct inference
INFERENCE_PERMISSION = "run_inference"


def may_read_jobs(principal: Principal) -> bool:
    """Reading jobs needs read_models or run_inference."""
    return any(principal.has(p) for p in JOB_READ_PERMISSIONS)


def require_job_reader(principal: Principal) -> None:
    """``may_read_jobs`` or 403."""
    if not may_read_jobs(principal):
        raise Forbidden("missing permission " + " or ".join(JOB_READ_PERMISSIONS))


def can_see_job(principal: Principal, client_id: str | None) -> bool:
    """Spec 14.1: a tenant's job is for callers with access to that tenant; a platform job (no
    tenant) is for admins and for callers without any tenant (machine tokens whose ``client_id``
    claim maps to no client). Tenant callers never see platform jobs."""
    if principal.is_admin:
        return True
    if client_id is None:
        return not principal.tenants
    return principal.can_access(client_id)


def require_job_access(principal: Principal, client_id: str | None) -> None:
    """``can_see_job`` or 403 (the route's messages)."""
    if not can_see_job(principal, client_id):
        if client_id is None:
            raise Forbidden("platform jobs are not visible to tenant callers")
        raise Forbidden(f"no access to client {client_id}")


def may_read_tenant(principal: Principal, client_id: str, permission: str = TENANT_READ_PERMISSION) -> bool:
    """The tenant rule without the database: ``permission`` and access to ``client_id`` (the
    client's existence is the route's 404, ``pie.deps.tenant_scope``)."""
    return principal.has(permission) and principal.can_access(client_id)


def require_tenant(principal: Principal, client_id: str, permission: str) -> None:
    """``may_read_tenant`` or 403: the permission first, then the tenant (the route's order)."""
    principal.require(permission)
    principal.require_tenant(client_id)


def may_run_inference(principal: Principal) -> bool:
    return principal.has(INFERENCE_PERMISSION)
