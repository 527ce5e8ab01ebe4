"""The job queue at a glance: counts by status, the oldest pending job, the recent failure rate.

One grouped query over ``jobs``; the console's queue page shows it and metrics can export it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from pie.jobs.models import Job

STATUSES = ("pending", "started", "success", "failure")


@dataclass
class QueueSummary:
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATUSES, 0))
    oldest_pending_at: datetime | None = None
    oldest_started_at: datetime | None = None
    # jobs that ended within ``window`` (by status), and the share of them that failed
    window: timedelta = timedelta(hours=1)
    recent_success: int = 0
    recent_failure: int = 0

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def failure_rate(self) -> float | None:
        """Failures among the jobs that ended within the window; None when none ended."""
        ended = self.recent_success + self.recent_failure
        return self.recent_failure / ended if ended else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "counts": dict(self.counts),
            "total": self.total,
            "oldest_pending_at": self.oldest_pending_at,
            "oldest_started_at": self.oldest_started_at,
            "window_seconds": self.window.total_seconds(),
            "recent_success": self.recent_success,
            "recent_failure": self.recent_failure,
            "failure_rate": self.failure_rate,
        }


async def queue_summary(
    session: AsyncSession, *, where: Any = None, window: timedelta = timedelta(hours=1)
) -> QueueSummary:
    """Counts by status, oldest pending/started job and the failure rate of jobs that ended in
    the last ``window``: one ``GROUP BY status`` query. ``where`` restricts the jobs counted
    (e.g. ``pie.jobs.logic.visible_jobs(principal)``); None counts every job."""
    since = func.now() - window
    stmt = select(
        Job.status,
        func.count(),
        func.min(Job.created_at),
        func.min(Job.started_at),
        func.count().filter(Job.completed_at >= since),
    ).group_by(Job.status)
    if where is not None:
        stmt = stmt.where(where)
    summary = QueueSummary(window=window)
    for status, count, oldest_created, oldest_started, recent in (await session.execute(stmt)).all():
        summary.counts[status] = count
        if status == "pending":
            summary.oldest_pending_at = oldest_created
        elif status == "started":
            summary.oldest_started_at = oldest_started
        elif status == "success":
            summary.recent_success = recent
        elif status == "failure":
            summary.recent_failure = recent
    return summary
