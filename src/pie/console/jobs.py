"""The overview, jobs (list, a job's page and its live fragment; cancelling and retrying a job) and
the queue summary."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Query, Request
from starlette.responses import HTMLResponse, RedirectResponse

from pie.console.common import (
    Confirmation,
    Confirmed,
    Cursor,
    Done,
    FormValues,
    JobIdPath,
    Pager,
    Problem,
    User,
    Writer,
    confirm_page,
    console_router,
    parse_time,
    refusal,
    rehearse_audited,
    render,
    write,
)
from pie.console.signin import ConsoleUser
from pie.deps import Session
from pie.errors import BadRequest, Forbidden, NotFound, PieError
from pie.jobs import cancel
from pie.jobs import logic as jobs
from pie.jobs.cancel import SERVICE_INIT, ensure_can_launch
from pie.jobs.logic import ENDED
from pie.jobs.summary import queue_summary
from pie.lifecycle import logic as lifecycle
from pie.policies import may_read_jobs
from pie.tables.jobs import Job

router = console_router()


@router.get("", response_class=HTMLResponse)
async def home(request: Request, user: User, session: Session):
    summary = None
    if may_read_jobs(user.principal):
        summary = await _summary(session, user)
    return render(request, "home.html", summary=summary)


JOB_STATUSES = ("pending", "started", "success", "failure")
JOB_TYPES = ("inference", "training")


@router.get("/jobs", response_class=HTMLResponse)
async def jobs_page(
    request: Request,
    user: User,
    session: Session,
    status: Annotated[str | None, Query(max_length=16)] = None,
    job_type: Annotated[str | None, Query(max_length=16)] = None,
    model: Annotated[str | None, Query(max_length=128)] = None,
    client: Annotated[str | None, Query(max_length=128)] = None,
    created_after: Annotated[str | None, Query(max_length=40)] = None,
    created_before: Annotated[str | None, Query(max_length=40)] = None,
    cursor: Cursor = None,
):
    if status and status not in JOB_STATUSES:
        raise BadRequest(f"status must be one of {', '.join(JOB_STATUSES)}")
    if job_type and job_type not in JOB_TYPES:
        raise BadRequest(f"job type must be one of {', '.join(JOB_TYPES)}")
    pager = Pager(request, cursor)
    rows = await jobs.list_jobs(
        session,
        user.principal,
        pager.params,
        pager.response,
        client_id=client or None,
        status=status or None,
        model_id=model or None,
        job_type=job_type or None,
        created_after=parse_time("created after", created_after),
        created_before=parse_time("created before", created_before),
    )
    filters = {
        "status": status or "",
        "job_type": job_type or "",
        "model": model or "",
        "client": client or "",
        "created_after": created_after or "",
        "created_before": created_before or "",
    }
    return render(
        request,
        "jobs.html",
        jobs=rows,
        filters=filters,
        statuses=JOB_STATUSES,
        job_types=JOB_TYPES,
        next_url=pager.next_url,
    )


# -- a job's page; cancelling and retrying it (spec 15.4) ------------------------------------------------

JOB_DONE = {
    "cancelled": "Job cancelled.",
    "retried": "Retry launched: this is the new job.",
}


def may_launch(user: ConsoleUser, job: Job) -> bool:
    """Whether the caller may cancel or retry ``job``: the rule of both API routes
    (``pie.jobs.cancel.ensure_can_launch``: the permission that launches the job's kind, for the
    job's tenant, or an admin)."""
    try:
        ensure_can_launch(user.principal, job)
    except Forbidden:
        return False
    return True


def job_actions(user: ConsoleUser, job: Job) -> dict[str, bool]:
    """The buttons of a job's page: Cancel while it is pending or started, Retry once it ended;
    each only for a caller who may launch that job."""
    allowed = may_launch(user, job)
    return {"cancel": allowed and job.status not in ENDED, "retry": allowed and job.status in ENDED}


async def _job(
    request: Request,
    user: ConsoleUser,
    session: Any,
    job_id: str,
    *,
    done: str | None = None,
    problem: Problem | None = None,
) -> HTMLResponse:
    job = await jobs.get_job(session, user.principal, job_id)
    return render(
        request,
        "job.html",
        status_code=problem.status_code if problem else 200,
        job=job,
        actions=job_actions(user, job),
        done=JOB_DONE.get(done or ""),
        problem=problem,
    )


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
async def job_page(request: Request, job_id: JobIdPath, user: User, session: Session, done: Done = None):
    return await _job(request, user, session, job_id, done=done)


@router.get("/jobs/{job_id}/live", response_class=HTMLResponse)
async def job_fragment(request: Request, job_id: JobIdPath, user: User, session: Session):
    """The job's live part (status, times, output, error): htmx polls it while the job runs. The
    answer that finds the job ended also replaces its buttons (Retry instead of Cancel)."""
    job = await jobs.get_job(session, user.principal, job_id)
    return render(request, "job_live.html", job=job, actions=job_actions(user, job), oob=True)


async def _ended_job(session: Any, job_id: str) -> Job:
    job = await session.get(Job, job_id, populate_existing=True)
    if job is None:
        raise NotFound(f"job {job_id} not found")
    return job


def _short(job_id: str) -> str:
    return job_id[-12:]


@router.post("/jobs/{job_id}/cancel", response_class=HTMLResponse)
async def cancel_job(request: Request, job_id: JobIdPath, user: Writer, session: Session, confirm: Confirmed = ""):
    """``canceljob`` (``pie.jobs.cancel.cancel_job``: 404, 403 for a caller who may not launch the
    job, 409 once it ended), after a confirmation saying what happens to its handler (the
    rehearsal's own error message)."""
    form = await FormValues.read(request)
    path = {"job_id": job_id}
    url = f"/console/jobs/{job_id}"

    async def run() -> dict[str, Any]:
        cancelled = await cancel.cancel_job(session, user.principal, job_id)
        return dict(cancelled.error) if isinstance(cancelled.error, dict) else {}

    try:
        if confirm != "yes":
            error, _summary = await rehearse_audited(request, session, user, "canceljob", path, {}, run)
            job = await _ended_job(session, job_id)
            return confirm_page(
                request,
                Confirmation(
                    title=f"Cancel job {_short(job_id)}",
                    question=f"Cancel this {job.job_type} job ({job.model_id} v{job.model_version})? It ends at once "
                    "as a failure with error code cancelled and fires nothing.",
                    button="Yes, cancel the job",
                    action_url=f"{url}/cancel",
                    cancel_url=url,
                    cancel_label="Back to the job",
                    crumbs=[("Jobs", "/console/jobs"), (_short(job_id), url)],
                    changes=[("Status", job.status, "failure (cancelled)")],
                    notes=[f"Its error will read: {error.get('message', 'cancelled')}."]
                    + (
                        ["It is the service's init job: the service becomes failed."]
                        if job.purpose == SERVICE_INIT
                        else []
                    ),
                    danger=True,
                ),
                form,
            )
        await write(request, session, user, "canceljob", path, {}, run)
    except PieError as exc:
        return await _job(request, user, session, job_id, problem=refusal(exc, "job-actions", form))
    return RedirectResponse(f"{url}?done=cancelled", status_code=303)


@router.post("/jobs/{job_id}/retry", response_class=HTMLResponse)
async def retry_job(request: Request, job_id: JobIdPath, user: Writer, session: Session, confirm: Confirmed = ""):
    """``retryjob`` (``pie.lifecycle.logic.retry_job``: a new job, the same input; through the
    same assignment key resolved again now, else on the same version), after a confirmation
    naming the version it would run on."""
    form = await FormValues.read(request)
    path = {"job_id": job_id}
    url = f"/console/jobs/{job_id}"

    async def run() -> tuple[str, str, str]:
        job = await lifecycle.retry_job(session, user.principal, job_id)
        return job.job_id, job.model_id, job.model_version

    try:
        if confirm != "yes":
            (_new, model_id, model_version), _summary = await rehearse_audited(
                request, session, user, "retryjob", path, {}, run
            )
            job = await _ended_job(session, job_id)
            how = (
                "through the same assignment key, resolved again now"
                if job.assignment_id is not None
                else "on the same model version"
            )
            return confirm_page(
                request,
                Confirmation(
                    title=f"Retry job {_short(job_id)}",
                    question=f"Retry this {job.job_type} job? A new job runs with the same input, {how}.",
                    button="Retry the job",
                    action_url=f"{url}/retry",
                    cancel_url=url,
                    crumbs=[("Jobs", "/console/jobs"), (_short(job_id), url)],
                    changes=[
                        ("Model version", f"{job.model_id} v{job.model_version}", f"{model_id} v{model_version}"),
                        ("Status", job.status, "a new pending job (this one stays as it is)"),
                    ],
                    notes=["It is an init job: the service is initializing until the new one ends."]
                    if job.purpose == SERVICE_INIT
                    else [],
                ),
                form,
            )
        new_id, _model, _version = await write(request, session, user, "retryjob", path, {}, run)
    except PieError as exc:
        return await _job(request, user, session, job_id, problem=refusal(exc, "job-actions", form))
    return RedirectResponse(f"/console/jobs/{new_id}?done=retried", status_code=303)


async def _summary(session: Any, user: ConsoleUser):
    return await queue_summary(session, where=jobs.visible_jobs(user.principal))


@router.get("/queue", response_class=HTMLResponse)
async def queue_page(request: Request, user: User, session: Session):
    return render(request, "queue.html", summary=await _summary(session, user))
