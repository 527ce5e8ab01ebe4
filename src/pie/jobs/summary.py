"""The job queue at a glance: counts by status, the oldest pending job, the recent failure rate.

One grouped query over ``jobs`` (``queue_query``): the console's queue page and the queue gauges
of ``/metrics`` both read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import case, func, select

from pie.tables.jobs import Job

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


def queue_query(
    *, where: Any = None, statuses: tuple[str, ...] | None = None, window: timedelta = timedelta(hours=1)
) -> Any:
    """The one grouped query behind the console's queue summary and the metrics' queue gauges
    (``pie_jobs_queue_depth``, ``pie_jobs_oldest_age_seconds``): per (status, job type) the
    count, the oldest creation and start, the jobs that ended within ``window`` and the age of
    the oldest job in seconds (pending: since creation; started: since its start), measured by
    the database clock. ``where`` restricts the jobs (a caller's visible jobs); ``statuses``
    only these statuses (the metrics read pending and started only)."""
    since = func.now() - window
    oldest = func.min(case((Job.status == "started", Job.started_at), else_=Job.created_at))
    stmt = select(
        Job.status.label("status"),
        Job.job_type.label("job_type"),
        func.count().label("n"),
        func.min(Job.created_at).label("oldest_created"),
        func.min(Job.started_at).label("oldest_started"),
        func.count().filter(Job.completed_at >= since).label("recent"),
        func.extract("epoch", func.now() - oldest).label("oldest"),
    ).group_by(Job.status, Job.job_type)
    if where is not None:
        stmt = stmt.where(where)
    if statuses is not None:
        stmt = stmt.where(Job.status.in_(statuses))
    return stmt


async def queue_summary(session: Any, *, where: Any = None, window: timedelta = timedelta(hours=1)) -> QueueSummary:
    """Counts by status, oldest pending/started job and the failure rate of jobs that ended in
    the last ``window``: one grouped query (``queue_query``). ``where`` restricts the jobs
    counted (e.g. ``pie.jobs.logic.visible_jobs(principal)``); None counts every job."""
    summary = QueueSummary(window=window)
    for row in (await session.execute(queue_query(where=where, window=window))).all():
        summary.counts[row.status] = summary.counts.get(row.status, 0) + row.n
        if row.status == "pending":
            summary.oldest_pending_at = _earliest(summary.oldest_pending_at, row.oldest_created)
        elif row.status == "started":
            summary.oldest_started_at = _earliest(summary.oldest_started_at, row.oldest_started)
        elif row.status == "success":
            summary.recent_success += row.recent
        elif row.status == "failure":
            summary.recent_failure += row.recent
    return summary


def _earliest(a: datetime | None, b: datetime | None) -> datetime | None:
    return b if a is None else a if b is None else min(a, b)
