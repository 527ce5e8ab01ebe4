"""The jobs table: durable job records and the dispatch queue (a transactional outbox)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import CheckConstraint, Float, ForeignKeyConstraint, Index, Integer, String, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from pie.db import Base, Timestamps


class Job(Timestamps, Base):
    __tablename__ = "jobs"
    # the INSERT returns the server defaults (id, status, timestamps) in its own round trip: no
    # refresh SELECT after a job is created
    __mapper_args__ = {"eager_defaults": True}

    job_id: Mapped[str] = mapped_column(
        String(64), primary_key=True, server_default=text("pie_uuid7()::text")
    )  # UUIDv7 text: time-ordered, generated in SQL so bulk INSERT ... SELECT works
    job_type: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), server_default="pending")
    model_id: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(128))
    assignment_id: Mapped[uuid.UUID | None]
    client_id: Mapped[str | None] = mapped_column(String(128))
    domain_id: Mapped[str | None] = mapped_column(String(128))
    service_id: Mapped[str | None] = mapped_column(String(128))
    subscription_id: Mapped[uuid.UUID | None]
    # why the job exists beyond its type, e.g. 'service_init' (its end sets the service status)
    purpose: Mapped[str | None] = mapped_column(String(32))
    input: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    # the service's resolved_features for service-scoped jobs (sent to the handler as `features`)
    # absent values are SQL NULL (not a JSON null), so ``IS NULL`` means "not set"
    features: Mapped[dict[str, Any] | None] = mapped_column(JSONB(none_as_null=True))
    # training jobs launched through a domain assignment: the domain's live features at launch
    # (sent to the handler as `domain_features`; spec 15.1); NULL otherwise
    domain_features: Mapped[list[Any] | None] = mapped_column(JSONB(none_as_null=True))
    output: Mapped[Any | None] = mapped_column(JSONB(none_as_null=True))
    # set only when the job ends in failure (spec 15.3)
    error: Mapped[Any | None] = mapped_column(JSONB(none_as_null=True))
    warnings: Mapped[list[Any]] = mapped_column(server_default=text("'[]'::jsonb"))
    attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    # the handler's own time-out (``timeout_seconds`` of its configuration); NULL: the global
    # PIE_JOB_TIMEOUT_SECONDS applies. Set at creation and again when a dispatcher claims the job.
    timeout_seconds: Mapped[float | None] = mapped_column(Float)
    # dispatch bookkeeping; dispatch_error: the latest failed dispatch that was retried (shown
    # as the job's `dispatch`)
    dispatch_error: Mapped[Any | None] = mapped_column(JSONB(none_as_null=True))
    next_attempt_at: Mapped[datetime] = mapped_column(server_default=text("now()"))
    locked_by: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None]
    started_at: Mapped[datetime | None]
    completed_at: Mapped[datetime | None]
    # set when the job was cancelled (``POST /v2/jobs/{id}/cancel``): every later completion is a 409
    cancelled_at: Mapped[datetime | None]
    # the job this one re-runs (``POST /v2/jobs/{id}/retry``)
    retry_of: Mapped[str | None] = mapped_column(String(64))
    # the experiment arm of a job launched through an assignment key (spec 15.7): 'primary',
    # 'split' or 'shadow'; NULL for jobs not launched through a key
    arm: Mapped[str | None] = mapped_column(String(16))
    # a shadow job: the job it copies
    shadow_of: Mapped[str | None] = mapped_column(String(64))
    # what ECS accepted for this job ({cluster, task_arn}), so a cancel can stop the task
    ecs_task: Mapped[dict[str, Any] | None] = mapped_column(JSONB(none_as_null=True))
    # who wrote the row (pie.audit.schemas.Actor); NULL before the audit trail and for platform writes
    created_by: Mapped[dict[str, Any] | None] = mapped_column(JSONB(none_as_null=True))

    __table_args__ = (
        CheckConstraint("job_type IN ('inference', 'training')", name="job_type"),
        CheckConstraint("status IN ('pending', 'started', 'success', 'failure')", name="status"),
        ForeignKeyConstraint(
            ["model_id", "model_version"],
            ["model_versions.model_id", "model_versions.version"],
            name="fk_jobs_model_version",
        ),
        ForeignKeyConstraint(["assignment_id"], ["assignments.assignment_id"], name="fk_jobs_assignment"),
        ForeignKeyConstraint(
            ["subscription_id"], ["event_subscriptions.id"], name="fk_jobs_subscription", ondelete="SET NULL"
        ),
        ForeignKeyConstraint(["retry_of"], ["jobs.job_id"], name="fk_jobs_retry_of"),
        ForeignKeyConstraint(["shadow_of"], ["jobs.job_id"], name="fk_jobs_shadow_of"),
        CheckConstraint("arm IN ('primary', 'split', 'shadow')", name="arm"),
        CheckConstraint("(arm = 'shadow') = (shadow_of IS NOT NULL)", name="shadow_of"),
        # the dispatch queue: only pending rows, oldest due first
        Index("ix_jobs_pending_due", "next_attempt_at", postgresql_where=text("status = 'pending'")),
        # started jobs, for the time-out and lease-recovery sweeps
        Index("ix_jobs_started", "started_at", postgresql_where=text("status = 'started'")),
        # started jobs by dispatcher, for the dead-dispatcher sweep
        Index("ix_jobs_locked_by", "locked_by", postgresql_where=text("status = 'started'")),
        Index("ix_jobs_client", "client_id", "domain_id", "service_id", "job_id"),
        Index("ix_jobs_model", "model_id", "model_version", "job_id"),
        Index("ix_jobs_assignment", "assignment_id"),
        # the shadow copies of a job (and the foreign key's lookups)
        Index("ix_jobs_shadow_of", "shadow_of", postgresql_where=text("shadow_of IS NOT NULL")),
    )


class TaskStop(Base):
    """An ECS task to stop (the outbox of cancellations): written in the transaction that
    cancels its job, or by the dispatcher when a task started for a job that had ended meanwhile;
    a dispatcher calls ``StopTask`` and deletes the row, retrying failures with backoff."""

    __tablename__ = "task_stops"

    task_arn: Mapped[str] = mapped_column(String(2048), primary_key=True)
    job_id: Mapped[str] = mapped_column(String(64))
    cluster: Mapped[str] = mapped_column(String(255))
    reason: Mapped[str] = mapped_column(String(255))
    attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    next_attempt_at: Mapped[datetime] = mapped_column(server_default=text("now()"))
    last_error: Mapped[Any | None] = mapped_column(JSONB(none_as_null=True))
    created_at: Mapped[datetime] = mapped_column(server_default=text("now()"))

    __table_args__ = (
        ForeignKeyConstraint(["job_id"], ["jobs.job_id"], name="fk_task_stops_job"),
        Index("ix_task_stops_due", "next_attempt_at"),
        Index("ix_task_stops_job", "job_id"),
    )
