"""Cancelling jobs (spec 15.4): ``POST /v2/jobs/{job_id}/cancel`` and the unfinished jobs of a
deleted service.

A pending or started job ends at once through :func:`pie.jobs.logic.finish_jobs` (the one way
a job ends: metrics, long-polls and the status of a service whose init job it was behave as for
any end) as ``failure`` with ``error.code = "cancelled"``, and records ``cancelled_at``: every
later completion of it is a 409 and its result is discarded. A failure fires no subscription,
so cancelled jobs fire nothing.

What was running is told to stop, after the commit:

- an ECS task: a ``task_stops`` row (written in the cancelling transaction) is worked by a
  dispatcher, which calls ``StopTask`` (retried with backoff); a task that ECS started for a
  job that had ended meanwhile is stopped the same way (``pie.dispatch.dispatcher``);
- an in-process handler: ``NOTIFY pie_job_cancel`` raises the cancel flag its context exposes
  (``pie.dispatch.inprocess.cancelled()``; cooperative);
- a Lambda invocation cannot be stopped: its report is answered 409 and ignored.

Rows are locked ``FOR UPDATE`` in job_id order (as ``finish_jobs`` locks them), so a cancel and
a completion racing for one job serialize on its row: exactly one of them ends it.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import bindparam, select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from pie.audit import context as audit
from pie.auth import Principal
from pie.errors import Conflict, Forbidden, NotFound
from pie.jobs.channels import CANCEL_CHANNEL
from pie.jobs.logic import ENDED, Completion, Outcome, ensure_job_access, finish_jobs
from pie.tables.jobs import Job, TaskStop

CANCELLED = "cancelled"  # error.code of a cancelled job
SERVICE_INIT = "service_init"  # Job.purpose of (re-)init jobs (pie.tenancy.logic.SERVICE_INIT)


def launch_permissions(job: Job) -> tuple[str, ...]:
    """Who may launch a job like ``job`` (spec 2.3): run_inference launches inference and
    training jobs; a service's (re-)init job is also launched with init_services."""
    return ("init_services", "run_inference") if job.purpose == SERVICE_INIT else ("run_inference",)


def ensure_can_launch(principal: Principal, job: Job) -> None:
    """Cancel and retry (spec 15.4): the caller may launch the job's kind for the job's tenant
    (the tenant rule of reading jobs, ``ensure_job_access``), or is an admin. 403 otherwise."""
    if principal.is_admin:
        return
    needed = launch_permissions(job)
    if not any(principal.has(p) for p in needed):
        raise Forbidden(f"missing permission {' or '.join(needed)}")
    ensure_job_access(principal, job)


def _who(actor: dict[str, Any] | None) -> str:
    if not actor:
        return "the platform"
    return str(actor.get("username") or actor.get("client_id") or actor.get("sub") or "an unnamed caller")


def _lock_rows() -> Any:
    from pie.tables.registry import ModelVersion

    mv = ModelVersion.__table__
    jobs = Job.__table__
    return (
        select(
            jobs.c.job_id,
            jobs.c.status,
            jobs.c.ecs_task,
            select(mv.c.handlers[jobs.c.job_type]["type"].astext)
            .where(mv.c.model_id == jobs.c.model_id, mv.c.version == jobs.c.model_version)
            .scalar_subquery()
            .label("handler_type"),
        )
        .where(jobs.c.job_id.in_(bindparam("ids", expanding=True)))
        .order_by(jobs.c.job_id)
        .with_for_update(of=jobs)
    )


def _stopping(row: Any) -> dict[str, str] | None:
    """The ECS task to stop for a started job whose task ECS accepted, or None."""
    task = row.ecs_task if row.status == "started" else None
    if isinstance(task, dict) and isinstance(task.get("task_arn"), str) and isinstance(task.get("cluster"), str):
        return {"task_arn": task["task_arn"], "cluster": task["cluster"]}
    return None


def _error(row: Any, reason: str, actor: dict[str, Any] | None) -> dict[str, Any]:
    task = _stopping(row)
    if task is not None:
        what = f"; its ECS task {task['task_arn']} is being stopped"
    elif row.status == "started" and row.handler_type == "in_process":
        what = "; the in-process handler was asked to stop (its result is discarded)"
    elif row.status == "started" and row.handler_type == "lambda":
        what = "; a Lambda invocation cannot be stopped (its report is ignored)"
    elif row.status == "started":
        what = "; whatever the handler reports is ignored"
    else:
        what = " before it was dispatched"
    error: dict[str, Any] = {
        "code": CANCELLED,
        "message": f"{reason}{what}",
        "cancelled_by": actor,
        "previous_status": row.status,
    }
    if task is not None:
        error["ecs_task_arn"] = task["task_arn"]
    return error


async def cancel_jobs(session: AsyncSession, job_ids: list[str], reason: str) -> dict[str, Outcome]:
    """Cancel the unfinished jobs among ``job_ids`` in the caller's transaction (set-based; the
    ended ones are left as they are). ``reason`` starts each job's ``error.message``. Returns
    the outcome of each job this call ended."""
    if not job_ids:
        return {}
    rows = [
        r for r in (await session.execute(_lock_rows(), {"ids": sorted(set(job_ids))})).all() if r.status not in ENDED
    ]
    if not rows:
        return {}
    actor = audit.actor(session)
    outcomes = await finish_jobs(
        session, [Completion(r.job_id, "failure", error=_error(r, reason, actor), cancelled=True) for r in rows]
    )
    stops = [
        {"task_arn": task["task_arn"], "cluster": task["cluster"], "job_id": r.job_id, "reason": "cancelled in PIE"}
        for r in rows
        if (task := _stopping(r)) is not None
    ]
    if stops:
        await session.execute(insert(TaskStop).on_conflict_do_nothing(index_elements=[TaskStop.task_arn]), stops)
    await session.execute(
        text("SELECT pg_notify(:channel, j) FROM unnest(CAST(:ids AS text[])) AS j"),
        {"channel": CANCEL_CHANNEL, "ids": [r.job_id for r in rows]},
    )
    return {job_id: o for job_id, o in outcomes.items() if o.result == "completed"}


async def cancel_job(session: AsyncSession, principal: Principal, job_id: str) -> Job:
    """``POST /v2/jobs/{job_id}/cancel``: 404 unknown, 403 (``ensure_can_launch``), 409 when the
    job has already ended (a second cancel included); else the cancelled job."""
    job = await session.get(Job, job_id, populate_existing=True)
    if job is None:
        raise NotFound(f"job {job_id} not found")
    ensure_can_launch(principal, job)
    audit.describe(session, client_id=job.client_id)
    ended = await cancel_jobs(session, [job_id], f"cancelled by {_who(audit.actor(session))}")
    job = await session.get(Job, job_id, populate_existing=True)
    assert job is not None  # jobs are never deleted
    if job_id not in ended:
        code = (job.error or {}).get("code") if isinstance(job.error, dict) else None
        detail = " (cancelled)" if job.cancelled_at is not None else (f" ({code})" if code else "")
        raise Conflict(f"job {job_id} has already ended with status {job.status}{detail}")
    return job
