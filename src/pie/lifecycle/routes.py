"""Cancel and retry a job (spec 15.4)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from pie.assignments.schemas import JobStarted
from pie.audit.routing import AuditedRoute
from pie.auth import Principal
from pie.deps import CurrentPrincipal, Session
from pie.errors import Forbidden, error_responses
from pie.idempotency import IDEMPOTENT
from pie.jobs import cancel
from pie.jobs.routes import JobIdPath
from pie.jobs.schemas import JobOut
from pie.lifecycle import logic

router = APIRouter(tags=["jobs"], route_class=AuditedRoute)

_NOT_FOUND = "the job does not exist"
_WHO = (
    "the caller may launch the job's kind for the job's tenant (run_inference; for a service's init job "
    "also init_services) with access to that tenant, or is an admin"
)


async def launcher(principal: CurrentPrincipal) -> Principal:
    """Cancel and retry need a permission that launches jobs (403 otherwise); the job's own
    kind and tenant are checked once it is read (``pie.jobs.cancel.ensure_can_launch``)."""
    if not (principal.has("run_inference") or principal.has("init_services")):
        raise Forbidden("missing permission run_inference or init_services")
    return principal


@router.post(
    "/v2/jobs/{job_id}/cancel",
    operation_id="canceljob",
    description="Cancel a pending or started job: it ends at once as `failure` with `error.code = "
    '"cancelled"` (a service\'s init job sets the service `failed`; a cancelled job fires nothing). A running '
    "ECS task is stopped (`StopTask`), an in-process handler is asked to stop (a cooperative flag; whatever it "
    "returns is discarded); a Lambda invocation cannot be stopped, and its later report is answered 409 and "
    f"ignored. Who: {_WHO}.",
    response_model=JobOut,
    responses=error_responses(e404=_NOT_FOUND, e409="the job has already ended (a cancelled job included)"),
)
async def cancel_job(job_id: JobIdPath, session: Session, principal: Annotated[Principal, Depends(launcher)]) -> JobOut:
    job = await cancel.cancel_job(session, principal, job_id)
    return JobOut.model_validate(job)


@router.post(
    "/v2/jobs/{job_id}/retry",
    operation_id="retryjob",
    description="Re-run an ended job: a new job with the same type, input, tenant, domain and service "
    "(`retry_of` names the original); an assignment job runs through the same assignment key resolved again "
    f"now, any other job on the same model version. Honours `Idempotency-Key`. Who: {_WHO}.",
    dependencies=[IDEMPOTENT],
    response_model=JobStarted,
    status_code=202,
    responses=error_responses(
        e404=_NOT_FOUND,
        e409="the job has not ended yet",
        e422="a launch now would be refused: client suspended, domain inactive, service deleted or departed, "
        "assignment key archived, version failed or archived, input failing the contract, payload too large",
    ),
)
async def retry_job(job_id: JobIdPath, session: Session, principal: Annotated[Principal, Depends(launcher)]):
    job = await logic.retry_job(session, principal, job_id)
    return {"job_id": job.job_id}
