"""Jobs: durable records of training and inference runs, and the dispatch queue.

``create_job`` is the one way a job comes to exist: it writes the row inside the caller's
transaction (the transactional outbox) and queues a NOTIFY that PostgreSQL delivers only if
that transaction commits, waking the dispatchers.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from pie.jobs.models import Job

NOTIFY_CHANNEL = "pie_jobs"


async def notify_new_jobs(session: AsyncSession) -> None:
    """Wake dispatchers when the current transaction commits (PostgreSQL folds repeats)."""
    await session.execute(text("SELECT pg_notify(:channel, '')"), {"channel": NOTIFY_CHANNEL})


async def create_job(
    session: AsyncSession,
    *,
    job_type: str,
    model_id: str,
    model_version: str,
    input: dict[str, Any] | None = None,
    features: dict[str, Any] | None = None,
    assignment_id: uuid.UUID | None = None,
    client_id: str | None = None,
    domain_id: str | None = None,
    service_id: str | None = None,
    subscription_id: uuid.UUID | None = None,
    purpose: str | None = None,
    warnings: list[Any] | None = None,
) -> Job:
    """Record a pending job in the caller's transaction; dispatch happens after commit."""
    job = Job(
        job_type=job_type,
        model_id=model_id,
        model_version=model_version,
        input=input if input is not None else {},
        features=features,
        assignment_id=assignment_id,
        client_id=client_id,
        domain_id=domain_id,
        service_id=service_id,
        subscription_id=subscription_id,
        purpose=purpose,
        warnings=list(warnings or []),
    )
    session.add(job)
    await session.flush()
    await session.refresh(job)
    await notify_new_jobs(session)
    return job
