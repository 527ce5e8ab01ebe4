"""The overview, jobs (list, a job's page and its live fragment) and the queue summary."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Query, Request
from starlette.responses import HTMLResponse

from pie.console.common import Cursor, JobIdPath, Pager, User, console_router, parse_time, render
from pie.console.signin import ConsoleUser
from pie.deps import Session
from pie.errors import BadRequest
from pie.jobs import logic as jobs
from pie.jobs.summary import queue_summary

router = console_router()


@router.get("", response_class=HTMLResponse)
async def home(request: Request, user: User, session: Session):
    summary = None
    if user.principal.has("read_models") or user.principal.has("run_inference"):
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


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
async def job_page(request: Request, job_id: JobIdPath, user: User, session: Session):
    job = await jobs.get_job(session, user.principal, job_id)
    return render(request, "job.html", job=job)


@router.get("/jobs/{job_id}/live", response_class=HTMLResponse)
async def job_fragment(request: Request, job_id: JobIdPath, user: User, session: Session):
    """The job's live part (status, times, output, error): htmx polls it while the job runs."""
    job = await jobs.get_job(session, user.principal, job_id)
    return render(request, "job_live.html", job=job)


async def _summary(session: Any, user: ConsoleUser):
    return await queue_summary(session, where=jobs.visible_jobs(user.principal))


@router.get("/queue", response_class=HTMLResponse)
async def queue_page(request: Request, user: User, session: Session):
    return render(request, "queue.html", summary=await _summary(session, user))
