"""The outbox: webhook events written in the transaction of the change they announce.

Each function here is the one call a capability makes where its change happens (``finish_jobs``,
assignment revisions, version status changes). Each is ONE statement, set-based whatever the
batch size: it selects the changed rows that some active webhook wants, inserts their events
(``webhook_events``, data rendered now, as of this change), inserts one delivery per (event,
webhook) (``webhook_deliveries``, the queue the delivery loop claims from) and, when it queued
anything, wakes the delivery loops at commit (``NOTIFY pie_webhooks``). When no webhook wants a
change it writes nothing, so a deployment without webhooks pays one cheap query per batch.

This module reads the other capabilities' tables by name in SQL and imports none of their
packages: it is a lower layer they call into.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from pie.webhooks.events import MAX_OUTPUT_BYTES

NOTIFY_CHANNEL = "pie_webhooks"


def _ts(column: str) -> str:
    """A timestamptz column as the API renders it (ISO-8601 UTC with ``Z``), or JSON null."""
    return f"""to_char({column} AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')"""


def _wanted(type_expr: str, client_expr: str) -> str:
    """SQL condition: some active webhook wants an event of this type and tenant (a tenant
    webhook its own tenant's events, a platform webhook every event)."""
    return (
        f"EXISTS (SELECT 1 FROM webhooks AS w WHERE w.status = 'active' AND ({type_expr}) = ANY(w.events) "
        f"AND (w.client_id IS NULL OR w.client_id = {client_expr}))"
    )


def _emit_statement(source: str) -> Any:
    """The one statement of a hook: ``source`` selects ``type, client_id, data`` of the events to
    write (only those some webhook wants)."""
    return text(
        f"""
        WITH ev AS (
            INSERT INTO webhook_events (type, client_id, data)
            {source}
            RETURNING id, type, client_id
        ), queued AS (
            INSERT INTO webhook_deliveries (event_id, webhook_id)
            SELECT ev.id, w.id FROM ev
            JOIN webhooks AS w ON w.status = 'active' AND ev.type = ANY(w.events)
                AND (w.client_id IS NULL OR w.client_id = ev.client_id)
            RETURNING 1
        )
        SELECT pg_notify('{NOTIFY_CHANNEL}', '') FROM (SELECT 1 FROM queued LIMIT 1) AS any_queued
        """
    )


# -- jobs and services ---------------------------------------------------------------------------

_JOB_TYPE = "CASE WHEN j.status = 'success' THEN 'job.succeeded' ELSE 'job.failed' END"
_SERVICE_TYPE = "CASE WHEN j.status = 'success' THEN 'service.available' ELSE 'service.failed' END"
# the job object without ``input`` (spec 15.6); ``output`` only up to 64 KiB of JSON, else left
# out and ``output_omitted: true`` (read it with GET /v2/jobs/{job_id})
_JOB_DATA = f"""
    jsonb_build_object(
        'job_id', j.job_id, 'job_type', j.job_type, 'status', j.status,
        'model_id', j.model_id, 'model_version', j.model_version, 'assignment_id', j.assignment_id,
        'client_id', j.client_id, 'domain_id', j.domain_id, 'service_id', j.service_id,
        'subscription_id', j.subscription_id, 'retry_of', j.retry_of, 'arm', j.arm, 'shadow_of', j.shadow_of,
        'error', j.error, 'warnings', j.warnings,
        'attempts', j.attempts, 'timeout_seconds', j.timeout_seconds, 'created_by', j.created_by,
        'created_at', {_ts("j.created_at")}, 'started_at', {_ts("j.started_at")},
        'completed_at', {_ts("j.completed_at")}, 'updated_at', {_ts("j.updated_at")}
    ) || CASE WHEN j.output IS NOT NULL AND octet_length(j.output::text) > {MAX_OUTPUT_BYTES}
              THEN jsonb_build_object('output_omitted', true)
              ELSE jsonb_build_object('output', j.output) END
"""
_SERVICE_DATA = f"""
    jsonb_build_object(
        'client_id', s.client_id, 'domain_id', s.domain_id, 'service_id', s.service_id,
        'status', CASE WHEN j.status = 'success' THEN 'available' ELSE 'failed' END,
        'departure_datetime', {_ts("s.departure_datetime")}, 'job_id', j.job_id,
        'updated_at', {_ts("s.updated_at")}
    )
"""
_JOBS_ENDED = _emit_statement(
    f"""
    SELECT {_JOB_TYPE}, j.client_id, {_JOB_DATA}
    FROM jobs AS j
    WHERE j.job_id = ANY(CAST(:job_ids AS text[])) AND j.status IN ('success', 'failure')
      AND j.arm IS DISTINCT FROM 'shadow'  -- a shadow job fires nothing (spec 15.7)
      AND {_wanted(_JOB_TYPE, "j.client_id")}
    UNION ALL
    SELECT {_SERVICE_TYPE}, s.client_id, {_SERVICE_DATA}
    FROM jobs AS j
    JOIN services AS s ON s.client_id = j.client_id AND s.domain_id = j.domain_id AND s.service_id = j.service_id
    WHERE j.job_id = ANY(CAST(:job_ids AS text[])) AND j.status IN ('success', 'failure')
      AND j.purpose = 'service_init' AND j.arm IS DISTINCT FROM 'shadow'
      -- the init job whose end set the service status: the service's newest init job, ended
      -- or not (the rule finish_jobs applies to the service row)
      AND NOT EXISTS (
          SELECT 1 FROM jobs AS newer
          WHERE newer.client_id = j.client_id AND newer.domain_id = j.domain_id
            AND newer.service_id = j.service_id AND newer.purpose = 'service_init'
            AND newer.job_id > j.job_id)
      AND {_wanted(_SERVICE_TYPE, "s.client_id")}
    """
)


async def jobs_ended(session: AsyncSession, job_ids: Sequence[str]) -> None:
    """``job.succeeded`` / ``job.failed`` for jobs that just ended in this transaction, and
    ``service.available`` / ``service.failed`` for the services whose status their end set."""
    if job_ids:
        await session.execute(_JOBS_ENDED, {"job_ids": list(job_ids)})


# -- assignments ----------------------------------------------------------------------------------

_ASSIGNMENT_DATA = f"""
    jsonb_build_object(
        'assignment_id', a.assignment_id, 'client_id', a.client_id, 'domain_id', a.domain_id,
        'service_id', a.service_id, 'assignment_key', a.assignment_key, 'model_id', a.model_id,
        'model_version', a.model_version, 'status', a.status, 'role', a.role, 'settings', a.settings,
        'metadata', a.metadata, 'split', a.split, 'shadow', a.shadow, 'created_by', a.created_by,
        'created_at', {_ts("a.created_at")},
        'updated_at', {_ts("a.updated_at")}
    )
"""
_REVISIONS_WRITTEN = _emit_statement(
    f"""
    SELECT 'assignment.changed', a.client_id, {_ASSIGNMENT_DATA}
    FROM assignments AS a
    WHERE a.assignment_id = ANY(CAST(:ids AS uuid[])) AND {_wanted("'assignment.changed'", "a.client_id")}
    """
)


async def assignment_revisions_written(session: AsyncSession, assignment_ids: Sequence[uuid.UUID]) -> None:
    """``assignment.changed`` for revisions just written (data: the new revision)."""
    if assignment_ids:
        await session.execute(_REVISIONS_WRITTEN, {"ids": [str(i) for i in assignment_ids]})


# -- model versions ---------------------------------------------------------------------------------

_VERSION_DATA = f"""
    jsonb_build_object(
        'model_id', v.model_id, 'version', v.version, 'previous_status', c.previous_status,
        'status', v.status, 'description', v.description, 'metadata', v.metadata,
        'created_at', {_ts("v.created_at")}, 'updated_at', {_ts("v.updated_at")}
    )
"""
_VERSIONS_CHANGED = _emit_statement(
    f"""
    SELECT 'version.status_changed', NULL, {_VERSION_DATA}
    FROM unnest(CAST(:model_ids AS text[]), CAST(:versions AS text[]), CAST(:previous AS text[]))
         AS c(model_id, version, previous_status)
    JOIN model_versions AS v ON v.model_id = c.model_id AND v.version = c.version
    WHERE {_wanted("'version.status_changed'", "NULL")}
    """
)


async def versions_status_changed(session: AsyncSession, changes: Sequence[tuple[str, str, str | None]]) -> None:
    """``version.status_changed`` (platform webhooks only) for versions whose status just
    changed: ``changes`` is (model_id, version, previous status)."""
    if changes:
        await session.execute(
            _VERSIONS_CHANGED,
            {
                "model_ids": [c[0] for c in changes],
                "versions": [c[1] for c in changes],
                "previous": [c[2] for c in changes],
            },
        )
