"""The queue's PostgreSQL channels, and the one way to announce new jobs.

A NOTIFY is delivered only when its transaction commits, so a job row and its announcement
arrive together (the transactional outbox). Below the rest of ``pie.jobs`` so that every
package that creates or watches jobs can use it without importing the job logic.
"""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

NOTIFY_CHANNEL = "pie_jobs"
DONE_CHANNEL = "pie_job_done"
# a job was cancelled (payload: its id): dispatchers raise the cancel flag of an in-process
# handler running it and stop ECS tasks (``pie.jobs.cancel``)
CANCEL_CHANNEL = "pie_job_cancel"


async def notify_new_jobs(session: AsyncSession) -> None:
    """Wake dispatchers when the current transaction commits (PostgreSQL folds repeats)."""
    await session.execute(text("SELECT pg_notify(:channel, '')"), {"channel": NOTIFY_CHANNEL})
