from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Path, Query, Response

from pie import db
from pie.auth import Principal
from pie.deps import CurrentPrincipal, ModelIdPath, ModelVersionPath, Session, require
from pie.errors import Forbidden
from pie.jobs import logic
from pie.jobs.models import Job
from pie.jobs.schemas import CompletionOut, JobCompletion, JobOut
from pie.jobs.waiting import wait_for_end
from pie.pagination import PageParams
from pie.registry.schemas import error_responses
from pie.routing import PieRoute
from pie.schemas import ID_PATTERN

router = APIRouter(route_class=PieRoute, tags=["jobs"])

JobIdPath = Annotated[str, Path(pattern=ID_PATTERN, description="job id", examples=["0192f1c4-7d1e-7c3a-9f3e-5b1f0e6a2d41"])]
IdQuery = Annotated[str | None, Query(pattern=ID_PATTERN)]
MAX_WAIT_SECONDS = 30


async def job_reader(principal: CurrentPrincipal) -> Principal:
    """Reading jobs needs read_models or run_inference (403 otherwise)."""
    if not (principal.has("read_models") or principal.has("run_inference")):
        raise Forbidden("missing permission read_models or run_inference")
    return principal


@router.get("/v2/jobs/{job_id}", operation_id="getjob", response_model=JobOut, responses=error_responses(404))
async def get_job(
    job_id: JobIdPath,
    principal: Annotated[Principal, Depends(job_reader)],
    wait: Annotated[
        float,
        Query(ge=0, le=MAX_WAIT_SECONDS, allow_inf_nan=False, description="seconds to wait for the job to end (long poll)"),
    ] = 0,
):
    """A job. With ``?wait=N`` the answer comes when the job ends or after N seconds, whichever
    is first; no database transaction is held while waiting."""

    async def read() -> Job:
        async with db.sessionmaker()() as s:
            return await logic.get_job(s, principal, job_id)

    job = await read()  # 404 / 403 at once
    if wait <= 0 or job.status in logic.ENDED:
        return job
    return await wait_for_end(job_id, wait, read, lambda j: j.status in logic.ENDED)


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
):
    """Jobs the caller may see, newest first (a bare array; next page via ``X-Next-Cursor``)."""
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
    )


@router.post(
    "/v2/models/{model_id}/versions/{model_version}/jobs/{job_id}/complete",
    operation_id="completemodeljob",
    response_model=CompletionOut,
    responses={
        207: {"model": CompletionOut, "description": "completed; a triggered subscription failed to dispatch"},
        **error_responses(404, 409),
    },
)
async def complete_job(
    model_id: ModelIdPath,
    model_version: ModelVersionPath,
    job_id: JobIdPath,
    body: JobCompletion,
    session: Session,
    response: Response,
    principal: Principal = require("complete_jobs"),
):
    """Report the end of a job (handlers call this at ``callback_url``). Repeating the same
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
