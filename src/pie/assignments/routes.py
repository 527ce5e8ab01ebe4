"""Assignments in domain and service scope (spec 6) and assignment jobs (spec 9.1)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Path, Query, Response

from pie.assignments import logic
from pie.assignments.models import Assignment
from pie.assignments.schemas import (
    AssignmentArms,
    AssignmentCreate,
    AssignmentDryRun,
    AssignmentJobRequest,
    AssignmentOut,
    AssignmentUpsert,
    JobStarted,
)
from pie.audit.routing import AuditedRoute
from pie.deps import DomainIdPath, ServiceIdPath, Session, TenantScope, tenant
from pie.idempotency import IDEMPOTENT
from pie.pagination import PageParams
from pie.reads import json_response
from pie.schemas import KEY_PATTERN
from pie.tenancy.schemas import error_responses

router = APIRouter(prefix="/v2/clients/{client_id}/domains/{domain_id}", tags=["assignments"], route_class=AuditedRoute)

KeyPath = Annotated[str, Path(pattern=KEY_PATTERN, examples=["default", "forecast"])]
DryRunQuery = Annotated[
    bool,
    Query(
        description="run every check (the freeze check included) and answer what would happen "
        "(200 with the would-be revision and the counts, or the 422 `blocking_services` body); "
        "nothing is written"
    ),
]
UPSERT_ANSWER = AssignmentOut | AssignmentDryRun
StatusQuery = Annotated[Literal["active", "archived"] | None, Query(description="only revisions in this status")]
Page = Annotated[PageParams, Depends()]


def _answer(result: Assignment | logic.DryRun) -> AssignmentOut | AssignmentDryRun:
    if isinstance(result, logic.DryRun):
        return AssignmentDryRun.model_validate(
            {
                "revision": result.revision,
                "services_checked": result.services_checked,
                "services_re_resolved": result.services_re_resolved,
            }
        )
    return AssignmentOut.model_validate(result)


# -- domain scope --------------------------------------------------------------------------------


@router.post(
    "/assignments",
    operation_id="upsertdomainmodelassignment",
    response_model=UPSERT_ANSWER,
    responses=error_responses(400, 404, blocked=True),
)
async def upsert_domain_assignment(
    domain_id: DomainIdPath,
    body: AssignmentCreate,
    session: Session,
    dry_run: DryRunQuery = False,
    scope: TenantScope = tenant("manage_domains"),
):
    """Create or update a domain assignment by the key in the body: the previous active
    revision is archived and a new one inserted, after the freeze check of every non-departed
    service (for an active revision). With `?dry_run=true` the answer is an
    `AssignmentDryRun` and nothing is written."""
    key = body.assignment_key
    return _answer(await logic.upsert_domain_assignment(session, scope, domain_id, key, body, dry_run=dry_run))


@router.get(
    "/assignments",
    operation_id="listdomainmodelassignments",
    responses=error_responses(400, 404),
    response_model=list[AssignmentOut],
)
async def list_domain_assignments(
    domain_id: DomainIdPath,
    session: Session,
    response: Response,
    page: Page,
    status: StatusQuery = None,
    scope: TenantScope = tenant("read_domains"),
):
    return await logic.list_assignments(session, scope, domain_id, None, status, page, response)


@router.put(
    "/assignments/{assignment_key}",
    operation_id="putdomainmodelassignment",
    response_model=UPSERT_ANSWER,
    responses=error_responses(400, 404, blocked=True),
)
async def put_domain_assignment(
    domain_id: DomainIdPath,
    assignment_key: KeyPath,
    body: AssignmentUpsert,
    session: Session,
    dry_run: DryRunQuery = False,
    scope: TenantScope = tenant("manage_domains"),
):
    """As the POST, with the key in the path; `?dry_run=true` likewise."""
    result = await logic.upsert_domain_assignment(session, scope, domain_id, assignment_key, body, dry_run=dry_run)
    return _answer(result)


@router.get(
    "/assignments/{assignment_key}",
    operation_id="getdomainmodelassignment",
    responses=error_responses(400, 404),
    response_model=AssignmentOut,
)
async def get_domain_assignment(
    domain_id: DomainIdPath, assignment_key: KeyPath, session: Session, scope: TenantScope = tenant("read_domains")
):
    """The key's active revision (404 if none)."""
    # the fast layer's read (pie.assignments.hot); none found: the 404s of the domain or the key
    row = await logic.read_active_domain_revision(scope.client_id, domain_id, assignment_key)
    if row is not None:
        return json_response(AssignmentOut, row)
    return await logic.get_active(session, scope, domain_id, None, assignment_key)


@router.get(
    "/assignments/{assignment_key}/revisions",
    operation_id="listdomainmodelassignmentrevisions",
    responses=error_responses(400, 404),
    response_model=list[AssignmentOut],
)
async def list_domain_assignment_revisions(
    domain_id: DomainIdPath,
    assignment_key: KeyPath,
    session: Session,
    response: Response,
    page: Page,
    scope: TenantScope = tenant("read_domains"),
):
    """Every revision of the key, newest first."""
    return await logic.list_revisions(session, scope, domain_id, None, assignment_key, page, response)


@router.get(
    "/assignments/{assignment_key}/arms",
    operation_id="getdomainmodelassignmentarms",
    responses=error_responses(400, 404),
    response_model=AssignmentArms,
)
async def get_domain_assignment_arms(
    domain_id: DomainIdPath, assignment_key: KeyPath, session: Session, scope: TenantScope = tenant("read_domains")
):
    """The experiment of the key's active revision (spec 15.7): each arm (primary, split, shadow)
    with its share and the jobs launched through the revision on it, by status (404 if none)."""
    return await logic.experiment_arms(session, scope, domain_id, None, assignment_key)


@router.post(
    "/assignments/{assignment_key}/jobs",
    operation_id="rundomainmodelassignmentjob",
    dependencies=[IDEMPOTENT],
    responses=error_responses(400, 404, 422),
    response_model=JobStarted,
    status_code=202,
)
async def run_domain_assignment_job(
    domain_id: DomainIdPath,
    assignment_key: KeyPath,
    session: Session,
    body: AssignmentJobRequest | None = None,
    scope: TenantScope = tenant("run_inference"),
):
    """Start a job through the key's active revision; poll `GET /v2/jobs/{job_id}`."""
    job = await logic.run_assignment_job(
        session, scope, domain_id, None, assignment_key, body or AssignmentJobRequest()
    )
    return {"job_id": job.job_id}


# -- service scope -------------------------------------------------------------------------------


@router.post(
    "/service/{service_id}/assignments",
    operation_id="upsertservicemodelassignment",
    responses=error_responses(400, 404, 422),
    response_model=AssignmentOut,
)
async def upsert_service_assignment(
    domain_id: DomainIdPath,
    service_id: ServiceIdPath,
    body: AssignmentCreate,
    session: Session,
    scope: TenantScope = tenant("manage_domains"),
):
    """Create or update a service assignment by the key in the body (no domain-wide check)."""
    return await logic.upsert_service_assignment(session, scope, domain_id, service_id, body.assignment_key, body)


@router.get(
    "/service/{service_id}/assignments",
    operation_id="listservicemodelassignments",
    responses=error_responses(400, 404),
    response_model=list[AssignmentOut],
)
async def list_service_assignments(
    domain_id: DomainIdPath,
    service_id: ServiceIdPath,
    session: Session,
    response: Response,
    page: Page,
    status: StatusQuery = None,
    scope: TenantScope = tenant("read_domains"),
):
    return await logic.list_assignments(session, scope, domain_id, service_id, status, page, response)


@router.put(
    "/service/{service_id}/assignments/{assignment_key}",
    operation_id="putservicemodelassignment",
    responses=error_responses(400, 404, 422),
    response_model=AssignmentOut,
)
async def put_service_assignment(
    domain_id: DomainIdPath,
    service_id: ServiceIdPath,
    assignment_key: KeyPath,
    body: AssignmentUpsert,
    session: Session,
    scope: TenantScope = tenant("manage_domains"),
):
    return await logic.upsert_service_assignment(session, scope, domain_id, service_id, assignment_key, body)


@router.get(
    "/service/{service_id}/assignments/{assignment_key}",
    operation_id="getservicemodelassignment",
    responses=error_responses(400, 404),
    response_model=AssignmentOut,
)
async def get_service_assignment(
    domain_id: DomainIdPath,
    service_id: ServiceIdPath,
    assignment_key: KeyPath,
    session: Session,
    scope: TenantScope = tenant("read_domains"),
):
    return await logic.get_active(session, scope, domain_id, service_id, assignment_key)


@router.get(
    "/service/{service_id}/assignments/{assignment_key}/revisions",
    operation_id="listservicemodelassignmentrevisions",
    responses=error_responses(400, 404),
    response_model=list[AssignmentOut],
)
async def list_service_assignment_revisions(
    domain_id: DomainIdPath,
    service_id: ServiceIdPath,
    assignment_key: KeyPath,
    session: Session,
    response: Response,
    page: Page,
    scope: TenantScope = tenant("read_domains"),
):
    return await logic.list_revisions(session, scope, domain_id, service_id, assignment_key, page, response)


@router.get(
    "/service/{service_id}/assignments/{assignment_key}/arms",
    operation_id="getservicemodelassignmentarms",
    responses=error_responses(400, 404),
    response_model=AssignmentArms,
)
async def get_service_assignment_arms(
    domain_id: DomainIdPath,
    service_id: ServiceIdPath,
    assignment_key: KeyPath,
    session: Session,
    scope: TenantScope = tenant("read_domains"),
):
    """As the domain route, for a service-scope key."""
    return await logic.experiment_arms(session, scope, domain_id, service_id, assignment_key)


@router.post(
    "/service/{service_id}/assignments/{assignment_key}/jobs",
    operation_id="runservicemodelassignmentjob",
    dependencies=[IDEMPOTENT],
    responses=error_responses(400, 404, 422),
    response_model=JobStarted,
    status_code=202,
)
async def run_service_assignment_job(
    domain_id: DomainIdPath,
    service_id: ServiceIdPath,
    assignment_key: KeyPath,
    session: Session,
    body: AssignmentJobRequest | None = None,
    scope: TenantScope = tenant("run_inference"),
):
    """Start a job through the service's key; the handler receives the service's
    `resolved_features` as `features`."""
    job = await logic.run_assignment_job(
        session, scope, domain_id, service_id, assignment_key, body or AssignmentJobRequest()
    )
    return {"job_id": job.job_id}
