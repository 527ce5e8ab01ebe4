"""Prometheus metrics (``GET /metrics``), built on ``prometheus-client``.

One process: the default in-memory registry. Several processes (``pie serve --workers N``):
the parent calls :func:`prepare_multiprocess` before the workers start, so every worker writes
its samples to files under ``PROMETHEUS_MULTIPROC_DIR`` and a scrape (answered by any worker)
aggregates the files of all of them (prometheus-client's multiprocess mode).

Label values are bounded: route templates (never raw paths), HTTP methods, status codes, job
types, handler types, job statuses, experiment arms. The queue depth is read from the database at scrape time.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_HANDLER_TYPES = frozenset({"lambda", "ecs_task", "in_process"})
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_JOB_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0)

HTTP_REQUESTS = Counter(
    "pie_http_requests", "HTTP requests answered, by route template, method and status", ["route", "method", "status"]
)
HTTP_LATENCY = Histogram(
    "pie_http_request_duration_seconds",
    "Time from the request's arrival to the end of its response, by route template and method",
    ["route", "method"],
    buckets=_LATENCY_BUCKETS,
)
JOBS_CREATED = Counter("pie_jobs_created", "Jobs created (committed), by job type", ["job_type"])
JOBS_CREATED_BY_ARM = Counter(
    "pie_jobs_arm_created",
    "Jobs launched through an assignment key (committed), by experiment arm: primary, split or shadow "
    "(spec 15.7; docs/experiments.md)",
    ["arm"],
)
for _arm in ("primary", "split", "shadow"):  # the series exist (at 0) before the first experiment
    JOBS_CREATED_BY_ARM.labels(_arm)
JOBS_ENDED = Counter(
    "pie_jobs_ended",
    "Jobs ended (committed), by job type, handler type and final status",
    ["job_type", "handler_type", "status"],
)
JOB_QUEUE_SECONDS = Histogram(
    "pie_job_queue_seconds",
    "Time from a job's creation to its (latest) start, by job type",
    ["job_type"],
    buckets=_JOB_BUCKETS,
)
JOB_END_SECONDS = Histogram(
    "pie_job_end_seconds",
    "Time from a job's creation to its end, by job type and final status",
    ["job_type", "status"],
    buckets=_JOB_BUCKETS,
)
DISPATCH_ATTEMPTS = Counter("pie_dispatch_attempts", "Jobs handed to a backend, by backend", ["backend"])
DISPATCH_FAILURES = Counter(
    "pie_dispatch_failures", "Hand-overs that failed (retried or not), by backend", ["backend", "retryable"]
)
FREEZE_CHECKS = Counter("pie_freeze_checks", "Default-assignment freeze checks, by result", ["result"])
FREEZE_SECONDS = Histogram("pie_freeze_check_duration_seconds", "Duration of a freeze check", buckets=_LATENCY_BUCKETS)
WEBHOOK_ATTEMPTS = Counter(
    "pie_webhook_delivery_attempts",
    "Webhook delivery attempts, by outcome: delivered (2xx), http_error (another status), gone (410: the "
    "webhook is disabled), network_error (no answer: refused, reset, timed out), refused (the target "
    "resolves to a non-public address)",
    ["outcome"],
)
WEBHOOK_DELIVERIES_ENDED = Counter(
    "pie_webhook_deliveries_ended",
    "Webhook deliveries that ended (committed), by status: delivered or failed (gave up after the retry "
    "window, or the receiver answered 410)",
    ["status"],
)
WEBHOOK_ATTEMPT_SECONDS = Histogram(
    "pie_webhook_delivery_duration_seconds",
    "Duration of one webhook delivery attempt (connect, request, response), by outcome",
    ["outcome"],
    buckets=_LATENCY_BUCKETS,
)
WEBHOOK_LAG_SECONDS = Histogram(
    "pie_webhook_delivery_lag_seconds",
    "Time from an event (the change's commit) to its successful delivery, retries included",
    buckets=_JOB_BUCKETS,
)
DB_POOL_IN_USE = Gauge(
    "pie_db_pool_connections_in_use",
    "Database connections checked out of the pool (summed over processes)",
    multiprocess_mode="livesum",
)
WORKER_UP = Gauge(
    "pie_worker_up", "1 per serving process (with a pid label under --workers)", multiprocess_mode="liveall"
)
LONG_POLLS = Gauge(
    "pie_long_polls_waiting",
    "Requests waiting for a job to end (?wait=N), summed over processes",
    multiprocess_mode="livesum",
)


def prepare_multiprocess(directory: str | os.PathLike[str]) -> Path:
    """Call in the parent before ``--workers`` processes start: empties ``directory`` and sets
    ``PROMETHEUS_MULTIPROC_DIR`` for the children (which import prometheus-client afresh)."""
    path = Path(directory)
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    os.environ[MULTIPROC_ENV] = str(path)
    return path


def multiprocess_enabled() -> bool:
    return bool(os.environ.get(MULTIPROC_ENV))


def process_exited(pid: int | None = None) -> None:
    """A worker stops: drop its live gauges (multiprocess mode only)."""
    if multiprocess_enabled():
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid or os.getpid())


# ---------------------------------------------------------------------------------------------
# recording (cheap: a dict lookup and a locked add each)


def route_label(route_path: str | None) -> str:
    return route_path or "unmatched"


def method_label(method: str) -> str:
    return method if method in _METHODS else "other"


def handler_label(handler_type: Any) -> str:
    if handler_type is None:
        return "none"
    return handler_type if handler_type in _HANDLER_TYPES else "other"


_REQUEST_CHILDREN: dict[tuple[str, str, int], tuple[Any, Any]] = {}


def observe_request(route: str, method: str, status: int, seconds: float) -> None:
    # the labelled children are looked up once per (route, method, status), not per request
    key = (route, method, status)
    children = _REQUEST_CHILDREN.get(key)
    if children is None:
        children = _REQUEST_CHILDREN[key] = (
            HTTP_REQUESTS.labels(route, method, str(status)),
            HTTP_LATENCY.labels(route, method),
        )
    children[0].inc()
    children[1].observe(seconds)


def on_commit(session: Any, callback: Callable[[], None]) -> None:
    """Run ``callback`` when ``session``'s transaction commits (dropped on rollback), so a job
    counts as created or ended only once it really is."""
    sync_session = getattr(session, "sync_session", session)
    sync_session.info.setdefault("pie_on_commit", []).append(callback)


def _install_session_hooks() -> None:
    from sqlalchemy import event
    from sqlalchemy.orm import Session

    def run(session: Session) -> None:
        for callback in session.info.pop("pie_on_commit", ()):
            callback()

    def drop(session: Session) -> None:
        session.info.pop("pie_on_commit", None)

    event.listen(Session, "after_commit", run)
    event.listen(Session, "after_soft_rollback", lambda session, previous: drop(session))


_install_session_hooks()


def jobs_created(job_types: Iterable[str], arms: Iterable[str] = ()) -> Callable[[], None]:
    """``job_types``: one per job created; ``arms``: the arm of each of them launched through an
    assignment key."""
    types = list(job_types)
    by_arm: dict[str, int] = {}
    for arm in arms:
        by_arm[arm] = by_arm.get(arm, 0) + 1

    def record() -> None:
        for job_type in types:
            JOBS_CREATED.labels(job_type).inc()
        for arm, count in by_arm.items():
            JOBS_CREATED_BY_ARM.labels(arm).inc(count)

    return record


def jobs_ended(rows: Iterable[tuple[str, Any, str, float | None]]) -> Callable[[], None]:
    """``rows``: (job_type, handler_type, status, seconds since creation)."""
    items = list(rows)

    def record() -> None:
        for job_type, handler_type, status, seconds in items:
            JOBS_ENDED.labels(job_type, handler_label(handler_type), status).inc()
            if seconds is not None:
                JOB_END_SECONDS.labels(job_type, status).observe(max(seconds, 0.0))

    return record


def job_started(job_type: str, queued_seconds: float | None) -> None:
    if queued_seconds is not None:
        JOB_QUEUE_SECONDS.labels(job_type).observe(max(float(queued_seconds), 0.0))


def dispatch_attempt(backend: Any, count: int = 1) -> None:
    DISPATCH_ATTEMPTS.labels(handler_label(backend)).inc(count)


def dispatch_failure(backend: Any, retryable: bool) -> None:
    DISPATCH_FAILURES.labels(handler_label(backend), "true" if retryable else "false").inc()


def webhook_attempt(outcome: str, seconds: float, lag_seconds: float | None = None) -> None:
    """One delivery attempt; ``lag_seconds`` (event to delivery) for a delivered one."""
    WEBHOOK_ATTEMPTS.labels(outcome).inc()
    WEBHOOK_ATTEMPT_SECONDS.labels(outcome).observe(max(seconds, 0.0))
    if lag_seconds is not None:
        WEBHOOK_LAG_SECONDS.observe(max(lag_seconds, 0.0))


def webhook_deliveries_ended(statuses: Iterable[str]) -> None:
    for status in statuses:
        WEBHOOK_DELIVERIES_ENDED.labels(status).inc()


class freeze_check:
    """``with metrics.freeze_check():`` times a freeze check: ``passed``, ``blocked`` (it raised
    ``AssignmentBlocked``: some service's features fail the contract) or ``error`` (bad input)."""

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        FREEZE_SECONDS.observe(time.perf_counter() - self.start)
        if exc_type is None:
            result = "passed"
        else:
            result = "blocked" if exc_type.__name__ == "AssignmentBlocked" else "error"
        FREEZE_CHECKS.labels(result).inc()


def instrument_pool(engine: Any) -> None:
    """Track connections checked out of ``engine``'s pool."""
    from sqlalchemy import event

    pool = engine.sync_engine.pool if hasattr(engine, "sync_engine") else engine.pool
    event.listen(pool, "checkout", lambda *a: DB_POOL_IN_USE.inc())
    event.listen(pool, "checkin", lambda *a: DB_POOL_IN_USE.dec())


# ---------------------------------------------------------------------------------------------
# scraping


class _Snapshot:
    def __init__(self, rows: list[Any]):
        self.rows = rows

    def collect(self) -> Iterable[Any]:
        depth = GaugeMetricFamily(
            "pie_jobs_queue_depth",
            "Jobs waiting (pending) or running (started), read at scrape time",
            labels=["status", "job_type"],
        )
        oldest = GaugeMetricFamily(
            "pie_jobs_oldest_age_seconds",
            "Age of the oldest pending job (since creation) / started job (since its start), read at scrape time",
            labels=["status", "job_type"],
        )
        seen = set()
        for row in self.rows:
            seen.add((row.status, row.job_type))
            depth.add_metric([row.status, row.job_type], row.n)
            oldest.add_metric([row.status, row.job_type], float(row.oldest or 0.0))
        for status in ("pending", "started"):  # the series exist even when the queue is empty
            for job_type in ("inference", "training"):
                if (status, job_type) not in seen:
                    depth.add_metric([status, job_type], 0)
                    oldest.add_metric([status, job_type], 0.0)
        yield depth
        yield oldest


async def render(engine: Any) -> tuple[bytes, str]:
    """The exposition text: this process's (or every worker's) samples plus the queue depth."""
    from prometheus_client import REGISTRY

    from pie.jobs.summary import queue_query

    if multiprocess_enabled():
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    body = generate_latest(registry)
    async with engine.connect() as conn:
        # the query of the console's queue summary (one source for both), waiting and running jobs
        rows = (await conn.execute(queue_query(statuses=("pending", "started")))).all()
    snapshot = CollectorRegistry()
    snapshot.register(_Snapshot(rows))
    return body + generate_latest(snapshot), CONTENT_TYPE_LATEST
