"""Domains and services: a domain's page (assignments, services, live features), a service's page."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from starlette.responses import HTMLResponse, Response

from pie.assignments import logic as assignments
from pie.console.common import Cursor, Pager, User, console_router, render
from pie.deps import ClientIdPath, DomainIdPath, ServiceIdPath, Session, tenant_scope
from pie.jobs import logic as jobs
from pie.pagination import PageParams
from pie.tenancy import logic as tenancy

router = console_router()


@router.get("/clients/{client_id}/domains/{domain_id}", response_class=HTMLResponse)
async def domain_page(
    request: Request,
    client_id: ClientIdPath,
    domain_id: DomainIdPath,
    user: User,
    session: Session,
    cursor: Cursor = None,
):
    scope = await tenant_scope(session, user.principal, client_id, "read_domains")
    domain = await tenancy.load_domain(session, scope.client_id, domain_id)
    pager = Pager(request, cursor)
    services = await tenancy.list_services(session, scope, domain_id, None, pager.params, pager.response)
    active = await assignments.list_assignments(
        session, scope, domain_id, None, "active", PageParams(limit=1000), Response()
    )
    default = await tenancy.active_default(session, scope.client_id, domain_id)
    governing = default[1] if default else None
    return render(
        request,
        "domain.html",
        client=scope.client,
        domain=domain,
        services=services,
        assignments=active,
        governing=governing,
        next_url=pager.next_url,
    )


@router.get("/clients/{client_id}/domains/{domain_id}/services/{service_id}", response_class=HTMLResponse)
async def service_page(
    request: Request,
    client_id: ClientIdPath,
    domain_id: DomainIdPath,
    service_id: ServiceIdPath,
    user: User,
    session: Session,
):
    scope = await tenant_scope(session, user.principal, client_id, "read_domains")
    service = await tenancy.get_service(session, scope, domain_id, service_id)
    active = await assignments.list_assignments(
        session, scope, domain_id, service_id, "active", PageParams(limit=1000), Response()
    )
    recent_jobs: list[Any] = []
    if user.principal.has("read_models") or user.principal.has("run_inference"):
        recent_jobs = await jobs.list_jobs(
            session,
            user.principal,
            PageParams(limit=10),
            Response(),
            client_id=scope.client_id,
            domain_id=domain_id,
            service_id=service_id,
        )
    names = sorted(set(service.provided_features) | set(service.resolved_features))
    return render(
        request,
        "service.html",
        client=scope.client,
        domain_id=domain_id,
        service=service,
        assignments=active,
        feature_names=names,
        jobs=recent_jobs,
    )
