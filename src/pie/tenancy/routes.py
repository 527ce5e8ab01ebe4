"""Domains, live features and services (spec 5)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Response

from pie.audit.routing import AuditedRoute
from pie.deps import DomainIdPath, ServiceIdPath, Session, TenantScope, tenant
from pie.idempotency import IDEMPOTENT
from pie.pagination import ListParams, PageParams, page_of_list
from pie.reads import json_response
from pie.tenancy import logic
from pie.tenancy.schemas import (
    BatchInitOut,
    ContractOut,
    DomainCreate,
    DomainOut,
    DomainUpdate,
    FeaturesDryRunOut,
    FeaturesOut,
    FeaturesUpdate,
    ServiceInit,
    ServiceInitOut,
    ServiceOut,
    ServiceUpdate,
    ServiceUpdated,
    error_responses,
)

router = APIRouter(prefix="/v2/clients/{client_id}/domains", tags=["domains"], route_class=AuditedRoute)


@router.post(
    "",
    operation_id="createdomain",
    dependencies=[IDEMPOTENT],
    responses=error_responses(400, 404, 409, 422),
    response_model=DomainOut,
    status_code=201,
)
async def create_domain(body: DomainCreate, session: Session, scope: TenantScope = tenant("manage_domains")):
    """Create a domain; `domain_id` is generated when omitted; `features` are validated (422)."""
    return await logic.create_domain(session, scope, body)


@router.get(
    "",
    operation_id="listdomains",
    responses=error_responses(400, 404),
    response_model=list[DomainOut],
)
async def list_domains(
    session: Session,
    response: Response,
    page: Annotated[PageParams, Depends()],
    scope: TenantScope = tenant("read_domains"),
):
    return await logic.list_domains(session, scope, page, response)


@router.get(
    "/{domain_id}",
    operation_id="getdomain",
    responses=error_responses(400, 404),
    response_model=DomainOut,
)
async def get_domain(domain_id: DomainIdPath, session: Session, scope: TenantScope = tenant("read_domains")):
    return await logic.load_domain(session, scope.client_id, domain_id)


@router.patch(
    "/{domain_id}",
    operation_id="updatedomain",
    responses=error_responses(400, 404, 422),
    response_model=DomainOut,
)
async def update_domain(
    domain_id: DomainIdPath, body: DomainUpdate, session: Session, scope: TenantScope = tenant("manage_domains")
):
    return await logic.update_domain(session, scope, domain_id, body)


@router.get(
    "/{domain_id}/features",
    operation_id="getdomainfeatures",
    responses=error_responses(400, 404),
    response_model=list[dict[str, Any]],
)
async def get_domain_features(
    domain_id: DomainIdPath,
    session: Session,
    response: Response,
    page: Annotated[ListParams, Depends()],
    scope: TenantScope = tenant("read_domains"),
):
    """The live feature definitions (the next-train draft), a bare array: every definition,
    unless `?limit=` (or `?cursor=`) asks for a page (next page's cursor in `X-Next-Cursor`)."""
    features = (await logic.load_domain(session, scope.client_id, domain_id)).features
    return page_of_list(features, page, response)


DryRunQuery = Annotated[
    bool,
    Query(
        description="answer the services whose provided_features would not resolve against the submitted "
        "features (`blocking_services`); nothing is written"
    ),
]


@router.put(
    "/{domain_id}/features",
    operation_id="updatedomainfeatures",
    responses=error_responses(400, 404, 422),
    response_model=FeaturesOut | FeaturesDryRunOut,
)
async def update_domain_features(
    domain_id: DomainIdPath,
    body: FeaturesUpdate,
    session: Session,
    dry_run: DryRunQuery = False,
    scope: TenantScope = tenant("manage_domains"),
):
    """Full replacement, persist-only: no service is re-resolved or re-run, and the governing
    schema (`GET .../contract`) does not change; writing `default` again takes a new snapshot.
    With `?dry_run=true` the answer is a `FeaturesDryRunOut` and nothing is written."""
    if dry_run:
        result = await logic.dry_run_features(session, scope, domain_id, body.features)
        return FeaturesDryRunOut.model_validate(
            {"features": result.features, "blocking_services": result.blocking_services}
        )
    return FeaturesOut(features=await logic.replace_features(session, scope, domain_id, body.features))


@router.get(
    "/{domain_id}/contract",
    operation_id="getdomaincontract",
    responses=error_responses(400, 404, 422),
    response_model=ContractOut,
)
async def get_domain_contract(domain_id: DomainIdPath, session: Session, scope: TenantScope = tenant("read_domains")):
    """The feature schema in force for the domain's services: the snapshot on the active `default`
    revision (the version's frozen schema, or a copy of the live features taken when the revision
    was written). 422 "no model assigned" without an active `default`."""
    found = await logic.get_contract(session, scope, domain_id)
    return ContractOut(
        features=found.features,
        source=found.source,
        model_id=found.assignment.model_id,
        model_version=found.assignment.model_version,
        assignment_id=found.assignment.assignment_id,
    )


@router.post(
    "/{domain_id}/service/init",
    operation_id="initdomainservice",
    dependencies=[IDEMPOTENT],
    responses=error_responses(400, 404, 409, 422),
    response_model=ServiceInitOut,
    status_code=202,
)
async def init_domain_service(
    domain_id: DomainIdPath, body: ServiceInit, session: Session, scope: TenantScope = tenant("init_services")
):
    """Store the service (status `initializing`) and start its init job through the active
    `default` assignment."""
    service, job = await logic.init_service(session, scope, domain_id, body)
    return {"service_id": service.service_id, "job_id": job.job_id}


@router.get(
    "/{domain_id}/services",
    operation_id="listdomainservices",
    responses=error_responses(400, 404),
    response_model=list[ServiceOut],
)
async def list_domain_services(
    domain_id: DomainIdPath,
    session: Session,
    response: Response,
    page: Annotated[PageParams, Depends()],
    departed: Annotated[bool | None, Query(description="only departed (true) or non-departed (false)")] = None,
    scope: TenantScope = tenant("read_domains"),
):
    return await logic.list_services(session, scope, domain_id, departed, page, response)


@router.post(
    "/{domain_id}/services/init",
    operation_id="initalldomainservices",
    dependencies=[IDEMPOTENT],
    responses=error_responses(400, 404, 422),
    response_model=BatchInitOut,
    status_code=202,
)
async def init_all_domain_services(
    domain_id: DomainIdPath, session: Session, scope: TenantScope = tenant("init_services")
):
    """A fresh init job for every non-departed service, with its stored `resolved_features`;
    each such service is `initializing` until its job ends. `jobs` names each service's job."""
    jobs = await logic.reinit_all_services(session, scope, domain_id)
    return {
        "dispatched_services": [service_id for service_id, _ in jobs],
        "jobs": [{"service_id": service_id, "job_id": job_id} for service_id, job_id in jobs],
    }


@router.get(
    "/{domain_id}/service/{service_id}",
    operation_id="getdomainservice",
    responses=error_responses(400, 404),
    response_model=ServiceOut,
)
async def get_domain_service(
    domain_id: DomainIdPath, service_id: ServiceIdPath, session: Session, scope: TenantScope = tenant("read_domains")
):
    # the fast layer's read (pie.tenancy.hot); none found: the 404s of the domain or the service
    row = await logic.read_service(scope.client_id, domain_id, service_id)
    if row is not None:
        return json_response(ServiceOut, row)
    return await logic.get_service(session, scope, domain_id, service_id)


@router.put(
    "/{domain_id}/service/{service_id}",
    operation_id="updatedomainservice",
    responses=error_responses(400, 404, 422),
    response_model=ServiceUpdated,
)
async def update_domain_service(
    domain_id: DomainIdPath,
    service_id: ServiceIdPath,
    body: ServiceUpdate,
    session: Session,
    scope: TenantScope = tenant("init_services"),
):
    """Shallow-merge `static_features` (a null value removes the key) and re-resolve against the
    governing schema; only the keys sent are validated (422). Stored keys the governing schema
    no longer defines are kept, left out of `resolved_features` and listed in
    `undefined_features`."""
    service, undefined = await logic.update_service(session, scope, domain_id, service_id, body)
    out = ServiceUpdated.model_validate(service)
    out.undefined_features = undefined
    return out


@router.post(
    "/{domain_id}/service/{service_id}/init",
    operation_id="reinitdomainservice",
    dependencies=[IDEMPOTENT],
    responses=error_responses(400, 404, 422),
    response_model=ServiceInitOut,
    status_code=202,
)
async def reinit_domain_service(
    domain_id: DomainIdPath,
    service_id: ServiceIdPath,
    session: Session,
    scope: TenantScope = tenant("init_services"),
):
    """Re-initialise one service: a fresh init job through the active `default` assignment with
    its stored `resolved_features` (as batch re-init does for every service); the service is
    `initializing` until the job ends. 404 unknown service; 422 when it has departed, the domain
    is inactive or has no model assigned."""
    service, job = await logic.reinit_service(session, scope, domain_id, service_id)
    return {"service_id": service.service_id, "job_id": job.job_id}


@router.delete(
    "/{domain_id}/service/{service_id}",
    operation_id="deletedomainservice",
    responses=error_responses(400, 404, 422),
    status_code=204,
    response_class=Response,
)
async def delete_domain_service(
    domain_id: DomainIdPath,
    service_id: ServiceIdPath,
    session: Session,
    scope: TenantScope = tenant("init_services"),
):
    """Delete a service: it leaves every list, freeze check and re-init, and its id may be
    initialised again. Its jobs stay (unfinished ones are cancelled); its service-scope
    assignment revisions stay as the id's history (active ones are archived); its replay
    subscriptions turn `stale`. 404 unknown; 422 departed (departed services are history)."""
    await logic.delete_service(session, scope, domain_id, service_id)
    return Response(status_code=204)
