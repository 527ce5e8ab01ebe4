"""Jobs: durable records of training and inference runs, and the dispatch queue.

``create_job`` is the one way a job comes to exist: it writes the row inside the caller's
transaction (the transactional outbox) and queues a NOTIFY that PostgreSQL delivers only if
that transaction commits, waking the dispatchers.

``finish_jobs`` is the one way a job ends (the completion route, in-process handlers, the
dispatcher's give-up and time-out paths, cancellation): it locks the rows, records the outcome, checks the
output contract, sets the status of a service whose init job ended, fires ``inference_complete``
subscriptions and announces the end on ``pie_job_done`` (``?wait=`` long-polls listen there).
Jobs with none of those extras (no output schema to check, no subscription to fire, no service
to set, no webhook event to write) end in one statement per batch (``_END_PLAIN``); the others
take the full path (``_finish_full``).
"""

from __future__ import annotations

import functools
import json
import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import SimpleNamespace
from typing import Any

import psycopg
from fastapi import Response
from sqlalchemy import Boolean, and_, bindparam, case, exists, func, select, text, tuple_, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql import ColumnElement

from pie import callbacks, db, metrics, policies, reads
from pie.audit import context as audit
from pie.auth import Principal
from pie.config import Settings, get_settings
from pie.dispatch.backends import build_payload, callback_token_ttl, payload_limit_problem
from pie.errors import Conflict, NotFound, Unprocessable
from pie.jobs.models import Job
from pie.jobs.schemas import JobOut
from pie.jsonschemas import validation_error
from pie.pagination import PageParams, paginate
from pie.webhooks import outbox as webhooks

log = logging.getLogger("pie.jobs")

NOTIFY_CHANNEL = "pie_jobs"
DONE_CHANNEL = "pie_job_done"
# a job was cancelled (payload: its id): dispatchers raise the cancel flag of an in-process
# handler running it and stop ECS tasks (``pie.jobs.cancel``)
CANCEL_CHANNEL = "pie_job_cancel"
ENDED = frozenset({"success", "failure"})


async def notify_new_jobs(session: AsyncSession) -> None:
    """Wake dispatchers when the current transaction commits (PostgreSQL folds repeats)."""
    await session.execute(text("SELECT pg_notify(:channel, '')"), {"channel": NOTIFY_CHANNEL})


def payload_problem(
    settings: Settings,
    handler: dict[str, Any] | None,
    *,
    job_type: str,
    model_id: str,
    model_version: str,
    input: dict[str, Any],
    features: dict[str, Any] | None = None,
    assignment_id: uuid.UUID | None = None,
    client_id: str | None = None,
    domain_id: str | None = None,
    service_id: str | None = None,
    domain_features: list[Any] | None = None,
) -> str | None:
    """Why the payload a dispatch would build for this job exceeds the limit of ``handler``'s
    type (the 422 message), or None. Shaped as a dispatch builds it: a job id and a callback
    token of the real length."""
    shaped = SimpleNamespace(
        job_id=str(uuid.UUID(int=0)),
        job_type=job_type,
        model_id=model_id,
        model_version=model_version,
        assignment_id=assignment_id,
        client_id=client_id,
        domain_id=domain_id,
        service_id=service_id,
        input=input,
        features=features,
        domain_features=domain_features,
    )
    payload = build_payload(settings, shaped, callbacks.placeholder(shaped, callback_token_ttl(settings, handler)))
    problem = payload_limit_problem(settings, handler, payload)
    return None if problem is None else f"job payload too large: {problem}"


async def create_job(
    session: AsyncSession,
    *,
    job_type: str,
    model_id: str,
    model_version: str,
    input: dict[str, Any] | None = None,
    features: dict[str, Any] | None = None,
    domain_features: list[Any] | None = None,
    assignment_id: uuid.UUID | None = None,
    client_id: str | None = None,
    domain_id: str | None = None,
    service_id: str | None = None,
    subscription_id: uuid.UUID | None = None,
    purpose: str | None = None,
    warnings: list[Any] | None = None,
    handlers: dict[str, Any] | None = None,
    retry_of: str | None = None,
    arm: str | None = None,
    shadow_of: str | None = None,
) -> Job:
    """Record a pending job in the caller's transaction; dispatch happens after commit.

    ``handlers``: the version's handlers when the caller has already read the version (saves a
    query). ``domain_features``: what a training job launched through a domain assignment
    carries to its handler (the domain's live features; spec 15.1). 422 when the payload its
    handler would receive exceeds the limit of the handler's type (ECS overrides, Lambda Event
    payload, the body limit for in-process jobs)."""
    from pie.registry.models import ModelVersion

    if handlers is not None:
        handler = handlers.get(job_type)
    else:
        handler = await session.scalar(
            select(ModelVersion.handlers[job_type]).where(
                ModelVersion.model_id == model_id, ModelVersion.version == model_version
            )
        )
    handler = handler if isinstance(handler, dict) else None
    settings = get_settings()
    job = Job(
        job_type=job_type,
        model_id=model_id,
        model_version=model_version,
        input=input if input is not None else {},
        features=features,
        domain_features=domain_features,
        assignment_id=assignment_id,
        client_id=client_id,
        domain_id=domain_id,
        service_id=service_id,
        subscription_id=subscription_id,
        purpose=purpose,
        retry_of=retry_of,
        arm=arm,
        shadow_of=shadow_of,
        warnings=list(warnings or []),
        timeout_seconds=(handler or {}).get("timeout_seconds"),
        # the actor of the write that launched it (a subscription's trigger included); None
        # for jobs the dispatcher creates on its own
        created_by=audit.actor(session),
    )
    problem = payload_problem(
        settings,
        handler,
        job_type=job_type,
        model_id=model_id,
        model_version=model_version,
        input=job.input,
        features=features,
        assignment_id=assignment_id,
        client_id=client_id,
        domain_id=domain_id,
        service_id=service_id,
        domain_features=domain_features,
    )
    if problem is not None:
        raise Unprocessable(problem)
    session.add(job)
    await session.flush()  # INSERT ... RETURNING the server defaults (Job: eager_defaults)
    await notify_new_jobs(session)
    metrics.on_commit(session, metrics.jobs_created([job_type], [arm] if arm is not None else []))
    return job


# --------------------------------------------------------------------------------------------
# reading


def ensure_job_access(principal: Principal, job: Job | Mapping[str, Any]) -> None:
    client_id = job["client_id"] if isinstance(job, Mapping) else job.client_id
    policies.require_job_access(principal, client_id)


def ensure_can_read(principal: Principal, job: Job | Mapping[str, Any]) -> None:
    """read_models or run_inference, and access to the job's tenant (``pie.policies``)."""
    policies.require_job_reader(principal)
    ensure_job_access(principal, job)


async def get_job(session: AsyncSession, principal: Principal, job_id: str) -> Job:
    job = await session.get(Job, job_id, populate_existing=True)
    if job is None:
        raise NotFound(f"job {job_id} not found")
    ensure_can_read(principal, job)
    return job


# built once: its compiled form is cached by SQLAlchemy; only the bound id changes. The columns
# ``JobOut`` reads (its hidden fields included: ``dispatch`` is derived from them)
_READ_JOB = select(*[c for c in Job.__table__.c if c.key in JobOut.model_fields]).where(
    Job.__table__.c.job_id == bindparam("job_id")
)


async def read_job(principal: Principal, job_id: str) -> Mapping[str, Any]:
    """``get_job`` as one Core read outside any transaction (the hot path of ``GET
    /v2/jobs/{id}`` and its long-poll): the row's ``JobOut`` columns."""
    row = await reads.fetch_one(_READ_JOB, {"job_id": job_id})
    if row is None:
        raise NotFound(f"job {job_id} not found")
    ensure_can_read(principal, row)
    return row


def visible_jobs(principal: Principal, client_id: str | None = None) -> ColumnElement[bool] | None:
    """The jobs ``principal`` may list (spec 14.1, the rule of ``policies.can_see_job`` as SQL; optionally
    only ``client_id``'s, 403 without access): a SQL condition, or None for every job (admins).
    403 without read_models or run_inference."""
    policies.require_job_reader(principal)
    if client_id is not None:
        principal.require_tenant(client_id)
        return Job.client_id == client_id
    if principal.is_admin:
        return None
    if principal.tenants:
        return Job.client_id.in_(sorted(principal.tenants))
    return Job.client_id.is_(None)


async def list_jobs(
    session: AsyncSession,
    principal: Principal,
    page: PageParams,
    response: Response,
    *,
    client_id: str | None = None,
    domain_id: str | None = None,
    service_id: str | None = None,
    status: str | None = None,
    model_id: str | None = None,
    job_type: str | None = None,
    created_after: datetime | None = None,
    created_before: datetime | None = None,
    arm: str | None = None,
) -> list[Job]:
    """Newest first. Admins see every job; tenant callers the jobs of their tenants; callers
    without a tenant the platform jobs (``visible_jobs``). ``client_id`` names a tenant the
    caller must be able to access (403)."""
    stmt = select(Job)
    condition = visible_jobs(principal, client_id)
    if condition is not None:
        stmt = stmt.where(condition)
    if domain_id is not None:
        stmt = stmt.where(Job.domain_id == domain_id)
    if service_id is not None:
        stmt = stmt.where(Job.service_id == service_id)
    if status is not None:
        stmt = stmt.where(Job.status == status)
    if model_id is not None:
        stmt = stmt.where(Job.model_id == model_id)
    if job_type is not None:
        stmt = stmt.where(Job.job_type == job_type)
    if arm is not None:
        stmt = stmt.where(Job.arm == arm)
    if created_after is not None:
        stmt = stmt.where(Job.created_at > created_after)
    if created_before is not None:
        stmt = stmt.where(Job.created_at < created_before)
    return await paginate(session, stmt, [Job.job_id], page, response, descending=True)


# --------------------------------------------------------------------------------------------
# ending


@dataclass
class Completion:
    """One job's outcome, as reported by a handler or decided by the dispatcher."""

    job_id: str
    status: str  # success | failure
    output: Any = None
    error: Any = None
    # ``output`` already encoded as JSON text that PostgreSQL can store (the dispatcher checks
    # and encodes in-process outputs once); it is what gets stored when set
    output_json: str | None = None
    # a cancellation (``pie.jobs.cancel``): the job records ``cancelled_at`` and every later
    # completion of it is a conflict
    cancelled: bool = False

    def stored_output(self) -> Any:
        """The output as it will be stored (and read back)."""
        return json.loads(self.output_json) if self.output_json is not None else self.output


@dataclass
class Outcome:
    job_id: str
    model_id: str
    model_version: str
    status: str
    triggered_events: list[dict[str, Any]] = field(default_factory=list)
    # "completed" (this call ended it), "repeat" (already ended the same way: nothing done),
    # "conflict" (already ended with the other status, or cancelled: nothing done)
    result: str = "completed"
    # the job had been cancelled before this call (its result is discarded)
    cancelled: bool = False

    @property
    def dispatch_errors(self) -> bool:
        return any("error" in event for event in self.triggered_events)

    def body(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "model_id": self.model_id,
            "model_version": self.model_version,
            "status": self.status,
            "triggered_events": self.triggered_events,
        }


DEFAULT_FAILURE = {"code": "handler_failure", "message": "the handler reported a failure without details"}

_jobs = Job.__table__
_finish_stmt = (
    update(_jobs)  # type: ignore[arg-type]  # __table__ is typed FromClause; a declarative model's is a Table
    .where(_jobs.c.job_id == bindparam("b_job_id"))
    .values(
        status=bindparam("b_status"),
        output=bindparam("b_output"),
        error=bindparam("b_error"),
        warnings=bindparam("b_warnings"),
        completed_at=func.now(),
        updated_at=func.now(),
        cancelled_at=case((bindparam("b_cancelled", type_=Boolean), func.now()), else_=None),
        lease_expires_at=None,
        locked_by=None,
    )
)


@functools.cache
def _lock_for_finish() -> Any:
    """The rows ``finish_jobs`` ends, locked ``FOR UPDATE`` in job_id order (a Core statement
    built once), with what the rest of the step needs to know: the handler type and age (for
    the metrics), whether the version has an output schema for the job type and whether the
    model has active ``inference_complete`` subscriptions that may fire (not for a job of an
    archived version) (so the batch of an instant handler does not pay a query for contracts
    or subscriptions it does not have)."""
    from pie.registry.models import EventSubscription, ModelVersion

    mv = ModelVersion.__table__
    sub = EventSubscription.__table__
    version = and_(mv.c.model_id == _jobs.c.model_id, mv.c.version == _jobs.c.model_version)
    output_schema = mv.c.handler_contracts[_jobs.c.job_type]["output_schema"]
    return (
        select(
            _jobs.c.job_id,
            _jobs.c.job_type,
            _jobs.c.status,
            _jobs.c.model_id,
            _jobs.c.model_version,
            _jobs.c.purpose,
            _jobs.c.client_id,
            _jobs.c.domain_id,
            _jobs.c.service_id,
            _jobs.c.warnings,
            _jobs.c.cancelled_at,
            select(mv.c.handlers[_jobs.c.job_type]["type"].astext)
            .where(version)
            .scalar_subquery()
            .label("handler_type"),
            exists()
            .where(version, func.coalesce(func.jsonb_typeof(output_schema), "null") != "null")
            .label("has_output_schema"),
            and_(
                # a shadow job fires nothing (spec 15.7)
                _jobs.c.arm.is_distinct_from("shadow"),
                exists().where(
                    sub.c.source_model_id == _jobs.c.model_id,
                    sub.c.trigger_event == "inference_complete",
                    sub.c.status == "active",
                    # subscriptions never fire on an archived version (spec 15.4)
                    ~exists().where(version, mv.c.status == "archived").correlate(_jobs),
                ),
            ).label("has_subscriptions"),
            func.extract("epoch", func.now() - _jobs.c.created_at).label("age_seconds"),
        )
        .where(_jobs.c.job_id.in_(bindparam("ids", expanding=True)))
        .order_by(_jobs.c.job_id)
        .with_for_update()
    )


# Ends, in one statement, the jobs of a batch that need nothing beyond their row: not ended yet,
# not a service's init job, no active webhook wanting its end, and (for a success) no output
# schema to check and, for inference, no active inference_complete subscription to fire. Rows are locked in job_id order (so that
# concurrent batches cannot deadlock), updated, and announced on pie_job_done; what it returns
# feeds the metrics. Every other job of the batch is left as it was for the full path.
_END_PLAIN = f"""
    WITH batch AS (
        SELECT * FROM unnest(CAST(%(ids)s AS text[]), CAST(%(statuses)s AS text[]),
                             CAST(%(outputs)s AS text[]), CAST(%(errors)s AS text[]))
            AS b(job_id, status, output, error)
    ), locked AS (
        SELECT j.job_id FROM jobs AS j
        JOIN batch AS b ON b.job_id = j.job_id
        JOIN model_versions AS mv ON mv.model_id = j.model_id AND mv.version = j.model_version
        WHERE j.job_id = ANY(CAST(%(ids)s AS text[]))  -- found by primary key, whatever the statistics
          AND j.status NOT IN ('success', 'failure') AND j.purpose IS DISTINCT FROM 'service_init'
          -- a job whose end some webhook wants takes the full path (its outbox rows, spec 15.6);
          -- a shadow job fires nothing (spec 15.7)
          AND (j.arm IS NOT DISTINCT FROM 'shadow' OR NOT EXISTS (
                SELECT 1 FROM webhooks AS w
                WHERE w.status = 'active' AND (w.client_id IS NULL OR w.client_id = j.client_id)
                  AND (CASE WHEN b.status = 'success' THEN 'job.succeeded' ELSE 'job.failed' END) = ANY(w.events)))
          AND (b.status <> 'success' OR (
                coalesce(jsonb_typeof(mv.handler_contracts -> j.job_type -> 'output_schema'), 'null') = 'null'
                AND (j.job_type <> 'inference' OR j.arm IS NOT DISTINCT FROM 'shadow' OR NOT EXISTS (
                    SELECT 1 FROM event_subscriptions AS s
                    WHERE s.source_model_id = j.model_id AND s.trigger_event = 'inference_complete'
                      AND s.status = 'active'))))
        ORDER BY j.job_id
        FOR UPDATE OF j
    ), ended AS (
        UPDATE jobs AS j
        SET status = b.status, output = CAST(b.output AS jsonb), error = CAST(b.error AS jsonb),
            completed_at = now(), updated_at = now(), lease_expires_at = NULL, locked_by = NULL
        FROM locked, batch AS b, model_versions AS mv
        WHERE j.job_id = locked.job_id AND b.job_id = locked.job_id
          AND mv.model_id = j.model_id AND mv.version = j.model_version
        RETURNING j.job_id, j.job_type, j.status, j.model_id, j.model_version,
                  mv.handlers -> j.job_type ->> 'type' AS handler_type,
                  EXTRACT(EPOCH FROM now() - j.created_at) AS age_seconds
    )
    SELECT job_id, job_type, status, model_id, model_version, handler_type, age_seconds,
           pg_notify('{DONE_CHANNEL}', job_id)
    FROM ended
"""


async def _driver_connection(session: AsyncSession) -> Any:
    """The psycopg connection under ``session``'s transaction."""
    conn = await session.connection()
    return (await conn.get_raw_connection()).driver_connection


def _json_text(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


async def finish_jobs(
    target: AsyncSession | psycopg.AsyncConnection[Any], completions: list[Completion]
) -> dict[str, Outcome]:
    """End jobs, set-based. Returns an outcome per job found (missing job ids are simply
    absent). Rows are locked ``FOR UPDATE`` in job_id order.

    ``target``: a session (the jobs end in its transaction: the completion route, the sweep) or
    a psycopg connection in autocommit (the dispatcher's recorder: the plain jobs of the batch
    end in one statement that is its own transaction; the others in a transaction of their own
    from the session pool)."""
    if not completions:
        return {}
    by_id = {c.job_id: c for c in completions}
    session = target if isinstance(target, AsyncSession) else None
    if session is not None:
        if session.new or session.dirty or session.deleted:
            await session.flush()  # the caller's own changes first (a Core statement does not autoflush)
        raw = await _driver_connection(session)
    else:
        raw = target
    ids: list[str] = []
    statuses: list[str] = []
    outputs: list[str | None] = []
    errors: list[str | None] = []
    for c in by_id.values():
        if c.cancelled:  # a cancellation records cancelled_at: the full path
            continue
        ids.append(c.job_id)
        statuses.append(c.status)
        if c.status == "success":
            text_ = c.output_json if c.output_json is not None else _json_text(c.output)
            outputs.append(None if text_ == "null" else text_)  # no output: SQL NULL, as the column's none_as_null
            errors.append(None)
        else:
            outputs.append(None)
            errors.append(_json_text(c.error if c.error is not None else DEFAULT_FAILURE))
    ended: list[Any] = []
    if ids:
        cursor = raw.cursor()
        await cursor.execute(_END_PLAIN, {"ids": ids, "statuses": statuses, "outputs": outputs, "errors": errors})
        ended = await cursor.fetchall()
    outcomes: dict[str, Outcome] = {}
    for job_id, _job_type, status, model_id, model_version, *_ in ended:
        outcomes[job_id] = Outcome(job_id, model_id, model_version, status)
    if ended:
        record = metrics.jobs_ended((r[1], r[5], r[2], float(r[6]) if r[6] is not None else None) for r in ended)
        if session is not None:
            metrics.on_commit(session, record)
        else:
            record()
    rest = [c for c in by_id.values() if c.job_id not in outcomes]
    if rest:
        if session is not None:
            outcomes.update(await _finish_full(session, rest))
        else:
            async with db.sessionmaker()() as own, own.begin():
                outcomes.update(await _finish_full(own, rest))
    return outcomes


async def _finish_full(session: AsyncSession, completions: list[Completion]) -> dict[str, Outcome]:
    """``finish_jobs`` for jobs with more to do than their row (or that ended already): in
    ``session``'s transaction, lock, check the output contracts, end, set services, fire
    subscriptions, announce."""
    by_id = {c.job_id: c for c in completions}
    rows = (await session.execute(_lock_for_finish(), {"ids": sorted(by_id)})).all()
    outcomes: dict[str, Outcome] = {}
    to_end = []
    for row in rows:
        wanted = by_id[row.job_id]
        outcome = Outcome(row.job_id, row.model_id, row.model_version, wanted.status)
        outcomes[row.job_id] = outcome
        if row.status in ENDED:
            outcome.status = row.status
            outcome.cancelled = row.cancelled_at is not None
            # a cancelled job takes no completion at all (its handler's result is discarded)
            outcome.result = "repeat" if row.status == wanted.status and not outcome.cancelled else "conflict"
            continue
        to_end.append(row)
    if not to_end:
        return outcomes

    # output contracts of the versions involved (those that have an output schema), one query
    with_output = {
        (r.model_id, r.model_version) for r in to_end if r.has_output_schema and by_id[r.job_id].status == "success"
    }
    contracts: dict[tuple[str, str], Any] = {}
    if with_output:
        from pie.registry.models import ModelVersion

        for mv in (
            await session.execute(
                select(ModelVersion.model_id, ModelVersion.version, ModelVersion.handler_contracts).where(
                    tuple_(ModelVersion.model_id, ModelVersion.version).in_(sorted(with_output))
                )
            )
        ).all():
            contracts[(mv.model_id, mv.version)] = mv.handler_contracts

    params = []
    for row in to_end:
        wanted = by_id[row.job_id]
        warnings = list(row.warnings or [])
        if wanted.status == "success":
            output, error = wanted.stored_output(), None
            schema = ((contracts.get((row.model_id, row.model_version)) or {}).get(row.job_type) or {}).get(
                "output_schema"
            )
            if schema is not None:
                problem = validation_error(schema, output)
                if problem is not None:
                    warnings.append(f"output does not match the {row.job_type} output_schema: {problem}")
                    log.warning("job %s: output does not match the contract: %s", row.job_id, problem)
        else:
            output, error = None, wanted.error if wanted.error is not None else dict(DEFAULT_FAILURE)
        params.append(
            {
                "b_job_id": row.job_id,
                "b_status": wanted.status,
                "b_output": output,
                "b_error": error,
                "b_warnings": warnings,
                "b_cancelled": wanted.cancelled,
            }
        )
    await session.execute(_finish_stmt, params)
    metrics.on_commit(
        session,
        metrics.jobs_ended(
            (
                r.job_type,
                r.handler_type,
                by_id[r.job_id].status,
                float(r.age_seconds) if r.age_seconds is not None else None,
            )
            for r in to_end
        ),
    )

    # the end of a service's init job sets the service status
    inits = [r for r in to_end if r.purpose == "service_init" and r.service_id is not None]
    if inits:
        from pie.tenancy.models import Service

        svc = Service.__table__
        newer = Job.__table__.alias("newer")
        await session.execute(
            update(svc)  # type: ignore[arg-type]  # __table__ is typed FromClause; a declarative model's is a Table
            .where(
                and_(
                    svc.c.client_id == bindparam("b_client"),
                    svc.c.domain_id == bindparam("b_domain"),
                    svc.c.service_id == bindparam("b_service"),
                    # only the newest init job of the service decides: an older one ending late
                    # never overrides a newer one, ended or still running (the service stays
                    # `initializing` until that one ends; job ids are time-ordered UUIDv7 text)
                    ~exists().where(
                        newer.c.client_id == bindparam("b_client"),
                        newer.c.domain_id == bindparam("b_domain"),
                        newer.c.service_id == bindparam("b_service"),
                        newer.c.purpose == "service_init",
                        newer.c.job_id > bindparam("b_job"),
                    ),
                )
            )
            .values(status=bindparam("b_svc_status"), updated_at=func.now()),
            [
                {
                    "b_job": r.job_id,
                    "b_client": r.client_id,
                    "b_domain": r.domain_id,
                    "b_service": r.service_id,
                    "b_svc_status": "available" if by_id[r.job_id].status == "success" else "failed",
                }
                # in service order: concurrent batches touching the same services cannot deadlock
                for r in sorted(inits, key=lambda r: (r.client_id, r.domain_id, r.service_id))
            ],
        )

    # job.succeeded/job.failed and service.available/service.failed for the webhooks that want them
    await webhooks.jobs_ended(session, [r.job_id for r in to_end])

    # successful inference jobs fire their model's inference_complete subscriptions (all of the
    # batch at once: a fixed number of queries, whatever the number of jobs)
    fired = [
        r for r in to_end if r.job_type == "inference" and by_id[r.job_id].status == "success" and r.has_subscriptions
    ]
    if fired:
        from pie.registry.events import Trigger, fire_triggers

        entries = await fire_triggers(
            session,
            "inference_complete",
            # fired jobs inherit the tenant of the job that fired them (spec 14.1)
            [Trigger(r.model_id, by_id[r.job_id].stored_output(), r.model_version, r.client_id) for r in fired],
        )
        for row, triggered in zip(fired, entries):
            outcomes[row.job_id].triggered_events = triggered

    await session.execute(
        text("SELECT pg_notify(:channel, j) FROM unnest(CAST(:ids AS text[])) AS j"),
        {"channel": DONE_CHANNEL, "ids": [r.job_id for r in to_end]},
    )
    return outcomes


class JobCancelled(Conflict):
    """409 for a completion of a cancelled job: the envelope plus ``"cancelled": true``, so a
    handler (``pie_handler_kit``) can tell it from a job that ended otherwise."""

    def body(self) -> dict[str, Any]:
        return {**super().body(), "cancelled": True}


async def complete_job(
    session: AsyncSession,
    *,
    model_id: str,
    model_version: str,
    job_id: str,
    status: str,
    output: Any = None,
    error: Any = None,
    principal: Principal | None = None,
) -> Outcome:
    """The completion route: 404 unless the job belongs to that version, 403 without access to
    the job's tenant (a platform job: 403 for tenant callers), 409 when it already ended with the other status, a no-op when it ended the same way.
    A cancelled job answers every completion with 409 (``JobCancelled``)."""
    job = await session.scalar(select(Job).where(Job.job_id == job_id))
    if job is None or job.model_id != model_id or job.model_version != model_version:
        raise NotFound(f"job {job_id} not found for model {model_id} version {model_version}")
    if principal is not None:
        ensure_job_access(principal, job)
    audit.describe(session, client_id=job.client_id)
    outcome = (await finish_jobs(session, [Completion(job_id, status, output, error)]))[job_id]
    if outcome.result == "conflict":
        if outcome.cancelled:
            raise JobCancelled(f"job {job_id} was cancelled; this {status} report is ignored")
        raise Conflict(f"job {job_id} already ended with status {outcome.status}")
    from pie.registry.events import shown_to

    outcome.triggered_events = shown_to(principal, outcome.triggered_events)
    return outcome
