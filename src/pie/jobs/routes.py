from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Response

from pie.audit.routing import AuditedRoute
from pie.auth import Principal
from pie.deps import CurrentPrincipal, ModelIdPath, ModelVersionPath, Session
from pie.errors import Forbidden
from pie.jobs import logic
from pie.jobs.schemas import CompletionConflictOut, CompletionOut, JobCompletion, JobOut
from pie.jobs.waiting import wait_for_end
from pie.pagination import PageParams
from pie.policies import require_job_reader
from pie.reads import json_response
from pie.registry.schemas import error_responses
from pie.schemas import ID_PATTERN

router = APIRouter(tags=["jobs"], route_class=AuditedRoute)

JobIdPath = Annotated[
    str, Path(pattern=ID_PATTERN, description="job id", examples=["0192f1c4-7d1e-7c3a-9f3e-5b1f0e6a2d41"])
]
IdQuery = Annotated[str | None, Query(pattern=ID_PATTERN)]
MAX_WAIT_SECONDS = 30


async def job_reader(principal: CurrentPrincipal) -> Principal:
    """Reading jobs needs read_models or run_inference (403 otherwise)."""
    require_job_reader(principal)
    return principal


@router.get("/v2/jobs/{job_id}", operation_id="getjob", response_model=JobOut, responses=error_responses(404))
async def get_job(
    job_id: JobIdPath,
    principal: Annotated[Principal, Depends(job_reader)],
    wait: Annotated[
        float,
        Query(
            ge=0, le=MAX_WAIT_SECONDS, allow_inf_nan=False, description="seconds to wait for the job to end (long poll)"
        ),
    ] = 0,
):
    """A job. With ``?wait=N`` the answer comes when the job ends or after N seconds, whichever
    is first; no database transaction is held while waiting."""

    async def read() -> Mapping[str, Any]:
        return await logic.read_job(principal, job_id)

    if wait <= 0:
        row = await read()
    else:
        # 404 / 403 at once (the first read); then no query until the job ends or time is up
        row = await wait_for_end(job_id, wait, read, lambda j: j["status"] in logic.ENDED)
    return json_response(JobOut, row)


@router.get("/v2/jobs", operation_id="listjobs", response_model=list[JobOut])
async def list_jobs(
    session: Session,
    response: Response,
    page: Annotated[PageParams, Depends()],
    principal: Annotated[Principal, Depends(job_reader)],
    client_id: IdQuery = None,
    domain_id: IdQuery = None,
    service_id: IdQuery = None,
    model_id: IdQuery = None,
    status: Annotated[Literal["pending", "started", "success", "failure"] | None, Query()] = None,
    job_type: Annotated[Literal["inference", "training"] | None, Query(description="only jobs of this type")] = None,
    arm: Annotated[
        Literal["primary", "split", "shadow"] | None,
        Query(description="only jobs of this experiment arm (spec 15.7; docs/experiments.md)"),
    ] = None,
    created_after: Annotated[
        datetime | None,
        Query(
            description="only jobs created after this ISO-8601 instant (no offset: UTC)",
            examples=["2026-01-01T00:00:00Z"],
        ),
    ] = None,
    created_before: Annotated[
        datetime | None,
        Query(
            description="only jobs created before this ISO-8601 instant (no offset: UTC)",
            examples=["2026-02-01T00:00:00Z"],
        ),
    ] = None,
):
    """Jobs the caller may see, newest first (a bare array; next page via ``X-Next-Cursor``).
    Admins see every job; tenant callers only their tenants' jobs; machine callers without a
    tenant only platform jobs (jobs with no tenant). Unknown query parameters are a 400."""
    return await logic.list_jobs(
        session,
        principal,
        page,
        response,
        client_id=client_id,
        domain_id=domain_id,
        service_id=service_id,
        status=status,
        model_id=model_id,
        job_type=job_type,
        created_after=_utc(created_after),
        created_before=_utc(created_before),
        arm=arm,
    )


async def completion_caller(
    principal: CurrentPrincipal,
    model_id: ModelIdPath,
    model_version: ModelVersionPath,
    job_id: JobIdPath,
) -> Principal:
    """Who may complete this job: the job's own callback token (spec 14.5; authenticated by
    ``pie.deps.current_principal``), or a caller token holding complete_jobs. A callback token
    for another job is 403; an expired one, or one whose signing key was retired, is 401."""
    bound = principal.claims.get("callback_job_id")
    if bound is not None:
        grant = (bound, principal.claims.get("callback_model_id"), principal.claims.get("callback_model_version"))
        if grant != (job_id, model_id, model_version):
            raise Forbidden(f"this callback token completes job {grant[0]} of {grant[1]} version {grant[2]} only")
        return principal
    principal.require("complete_jobs")
    return principal


def _utc(value: datetime | None) -> datetime | None:
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=timezone.utc)


@router.post(
    "/v2/models/{model_id}/versions/{model_version}/jobs/{job_id}/complete",
    operation_id="completemodeljob",
    response_model=CompletionOut,
    responses={
        207: {"model": CompletionOut, "description": "completed; a triggered subscription failed to dispatch"},
        **error_responses(404),
        409: {
            "model": CompletionConflictOut,
            "description": "the job already ended with the other status; or it was cancelled (`cancelled: true`): "
            "the report is ignored",
        },
    },
)
async def complete_job(
    model_id: ModelIdPath,
    model_version: ModelVersionPath,
    job_id: JobIdPath,
    body: JobCompletion,
    session: Session,
    response: Response,
    principal: Annotated[Principal, Depends(completion_caller)],
):
    """Report the end of a job (handlers call this at ``callback_url`` with the payload's
    ``callback_token`` as bearer token, or any token holding complete_jobs). Repeating the same
    status is a no-op; the other status is 409. 207 when a triggered subscription failed."""
    outcome = await logic.complete_job(
        session,
        model_id=model_id,
        model_version=model_version,
        job_id=job_id,
        status=body.status,
        output=body.output,
        error=body.error,
        principal=principal,
    )
    if outcome.dispatch_errors:
        response.status_code = 207
    return outcome.body()
