"""The dispatcher: moves jobs from the ``jobs`` table (a transactional outbox) to their handlers.

One cycle:

1. claim due pending jobs with ``FOR UPDATE SKIP LOCKED`` and mark them ``started`` (attempts+1,
   ``locked_by``, a lease) in one short transaction, so any number of dispatchers on any number
   of machines can share the database and each job is claimed by exactly one of them;
2. after that commit, hand each job to the backend of its version's handler for its job_type:
   with a payload carrying the job's callback token (:mod:`pie.callbacks`):
   Lambda ``Invoke`` (``Event``) or ECS ``RunTask`` in a thread, then the lease is cleared and the
   job stays ``started`` until the completion callback; in-process implementations run in a
   thread pool (the lease is renewed while they run) and their result ends the job through
   :func:`pie.jobs.logic.finish_jobs`, the same code the completion route uses;
3. a failed dispatch goes back to ``pending`` with exponential backoff and jitter, and after
   ``dispatch_max_attempts`` ends in ``failure`` with a structured error.

Dispatchers wake on ``LISTEN pie_jobs`` (``create_job`` notifies at commit) with a polling
fallback. Every ``dispatch_sweep_interval`` seconds a dispatcher also ends started jobs older than
their handler's ``timeout_seconds`` (else ``job_timeout_seconds``) ("timed out") and returns jobs whose lease expired (their dispatcher
died) to the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import json
import logging
import math
import os
import random
import re
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
from sqlalchemy import text

from pie import callbacks, db, metrics
from pie.config import Settings
from pie.dispatch.backends import AwsBackends, DispatchError, build_payload, callback_token_ttl, public_url_warning
from pie.dispatch.inprocess import HandlerFailure, get_implementation
from pie.dispatch.threads import DaemonThreadPool
from pie.jobs.logic import NOTIFY_CHANNEL, Completion, finish_jobs, notify_new_jobs
from pie.logconfig import job_id_var
from pie.schemas import unstorable_json

log = logging.getLogger("pie.dispatch")

# characters PostgreSQL text/jsonb cannot hold
_UNSTORABLE_TEXT = re.compile("[\x00\ud800-\udfff]")
AWS_CONCURRENCY = 16
COMPLETION_BATCH = 500

_CLAIM = text(
    """
    WITH due AS (
        SELECT job_id FROM jobs
        WHERE status = 'pending' AND next_attempt_at <= now()
        ORDER BY next_attempt_at
        LIMIT :limit
        FOR UPDATE SKIP LOCKED
    )
    UPDATE jobs AS j
    SET status = 'started', attempts = j.attempts + 1, started_at = now(), updated_at = now(),
        locked_by = :me, lease_expires_at = now() + make_interval(secs => :lease),
        timeout_seconds = CAST(mv.handlers -> j.job_type ->> 'timeout_seconds' AS double precision)
    FROM due, model_versions AS mv
    WHERE j.job_id = due.job_id AND mv.model_id = j.model_id AND mv.version = j.model_version
    RETURNING j.job_id, j.job_type, j.model_id, j.model_version, j.assignment_id, j.client_id,
              j.domain_id, j.service_id, j.input, j.features, j.attempts, mv.handlers -> j.job_type AS handler,
              EXTRACT(EPOCH FROM now() - j.created_at) AS queued_seconds
    """
)
_RENEW = text(
    """
    UPDATE jobs SET lease_expires_at = now() + make_interval(secs => :lease)
    WHERE job_id = ANY(CAST(:ids AS text[])) AND status = 'started' AND locked_by = :me
      AND lease_expires_at IS NOT NULL
    """
)
# an AWS handler accepted the job: no lease any more, the time-out applies from now on
# (plus a warning when its callback cannot arrive, once)
_DISPATCHED = text(
    """
    UPDATE jobs SET lease_expires_at = NULL, error = NULL, updated_at = now(),
        warnings = CASE WHEN CAST(:warning AS text) IS NULL
                          OR warnings @> jsonb_build_array(CAST(:warning AS text)) THEN warnings
                        ELSE warnings || jsonb_build_array(CAST(:warning AS text)) END
    WHERE job_id = :job_id AND status = 'started' AND locked_by = :me
    """
)
_RETRY = text(
    """
    UPDATE jobs SET status = 'pending', locked_by = NULL, lease_expires_at = NULL,
        next_attempt_at = now() + make_interval(secs => :delay), error = CAST(:error AS jsonb), updated_at = now()
    WHERE job_id = :job_id AND status = 'started' AND locked_by = :me
    """
)
_RELEASE = text(
    """
    UPDATE jobs SET status = 'pending', locked_by = NULL, lease_expires_at = NULL,
        next_attempt_at = now(), updated_at = now()
    WHERE job_id = ANY(CAST(:ids AS text[])) AND status = 'started' AND locked_by = :me
    """
)
_TIMED_OUT = text(
    """
    SELECT job_id, attempts, started_at, coalesce(timeout_seconds, :timeout) AS timeout FROM jobs
    WHERE status = 'started' AND started_at < now() - make_interval(secs => coalesce(timeout_seconds, :timeout))
    ORDER BY started_at LIMIT 200
    FOR UPDATE SKIP LOCKED
    """
)
_REQUEUE_EXPIRED = text(
    """
    WITH expired AS (
        SELECT job_id FROM jobs
        WHERE status = 'started' AND lease_expires_at < now() AND attempts < :max_attempts
        ORDER BY lease_expires_at LIMIT 1000
        FOR UPDATE SKIP LOCKED
    )
    UPDATE jobs AS j SET status = 'pending', locked_by = NULL, lease_expires_at = NULL,
        next_attempt_at = now(), updated_at = now(),
        error = jsonb_build_object('code', 'lease_expired', 'message',
            'the dispatcher running this job stopped renewing its lease; the job was queued again',
            'previous_dispatcher', j.locked_by, 'attempts', j.attempts)
    FROM expired WHERE j.job_id = expired.job_id
    RETURNING j.job_id
    """
)
_EXPIRED_EXHAUSTED = text(
    """
    SELECT job_id, attempts, locked_by FROM jobs
    WHERE status = 'started' AND lease_expires_at < now() AND attempts >= :max_attempts
    ORDER BY lease_expires_at LIMIT 200
    FOR UPDATE SKIP LOCKED
    """
)


def _run_implementation(implementation: Any, payload: dict[str, Any]) -> Any:
    """In a pool thread: run the implementation; its output must be JSON that PostgreSQL can
    store (no NaN/Infinity, no NUL characters or unpaired surrogates)."""
    output = implementation(payload)
    try:
        output = json.loads(json.dumps(output, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise HandlerFailure("invalid_output", f"the handler returned output that is not JSON: {exc}") from exc
    problem = unstorable_json(output)
    if problem is not None:
        raise HandlerFailure("invalid_output", f"the handler returned output that cannot be stored: {problem}")
    return output


def storable_error(error: Any) -> Any:
    """A failure's error as JSON PostgreSQL can store: values that are not JSON become their
    ``repr``, non-finite numbers strings, NUL characters and unpaired surrogates U+FFFD."""

    def clean(value: Any) -> Any:
        if isinstance(value, str):
            return _UNSTORABLE_TEXT.sub("\ufffd", value)
        if isinstance(value, float) and not math.isfinite(value):
            return str(value)
        if isinstance(value, dict):
            return {clean(str(k)): clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    return clean(json.loads(json.dumps(error, default=repr)))


def backoff_delay(settings: Settings, attempts: int) -> float:
    """Exponential backoff with (equal) jitter for the next try after ``attempts`` tries."""
    ceiling = min(settings.dispatch_backoff_max, settings.dispatch_backoff_base * (2 ** max(attempts - 1, 0)))
    return ceiling / 2 + random.uniform(0, ceiling / 2)


async def _fail_all(session: Any, rows: Sequence[Any], error_for: Callable[[Any], dict[str, Any]]) -> None:
    """End every job of ``rows`` in failure with ``error_for(row)`` (through the one completion path)."""
    if rows:
        await finish_jobs(session, [Completion(r.job_id, "failure", error=error_for(r)) for r in rows])


class Dispatcher:
    def __init__(self, settings: Settings, name: str = "dispatcher"):
        self.settings = settings
        self.name = name
        # unique per dispatcher instance: leases and releases are keyed on it
        self.worker_id = f"{name}@{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"[:128]
        self.capacity = max(settings.dispatch_batch_size * 2, settings.in_process_workers * 2, 1)
        self.dispatched = 0
        self._aws = AwsBackends(settings)
        self._aws_slots = asyncio.Semaphore(AWS_CONCURRENCY)
        self._keys = callbacks.KeyCache()
        self._pool: DaemonThreadPool | None = None
        self._completions: asyncio.Queue[Completion] = asyncio.Queue()
        self._inflight: set[str] = set()  # claimed by us and not yet handed over / ended
        self._leased: set[str] = set()  # the subset whose lease we renew
        self._tasks: set[asyncio.Task[Any]] = set()
        self._background: list[asyncio.Task[Any]] = []
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopping = False
        self._running = False
        self._last_sweep = 0.0

    # ---------------------------------------------------------------------------------------
    # lifecycle

    def _start_workers(self) -> None:
        self._pool = DaemonThreadPool(max_workers=max(self.settings.in_process_workers, 1), thread_name_prefix="pie-job")
        self._background += [
            asyncio.create_task(self._completer(), name=f"{self.name}-completer"),
            asyncio.create_task(self._renewer(), name=f"{self.name}-lease-renewer"),
        ]

    async def start(self) -> None:
        """Start dispatching in the background (LISTEN + polling loop)."""
        if self._running:
            return
        self._running = True
        self._start_workers()
        self._background += [
            asyncio.create_task(self._listen(), name=f"{self.name}-listener"),
            asyncio.create_task(self._loop(), name=f"{self.name}-loop"),
        ]
        log.info("dispatcher %s started", self.worker_id)

    async def stop(self, grace: float = 10.0) -> None:
        """Stop claiming; let running jobs finish for up to ``grace`` seconds, then give the
        rest back to the queue for another dispatcher."""
        if self._stopping:
            return
        self._stopping = True
        for task in self._background:
            if task.get_name().endswith(("-listener", "-loop")):
                task.cancel()
        if self._inflight:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout=grace)
        for task in list(self._tasks):
            task.cancel()
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._background, return_exceptions=True)
        # whatever ended but was not recorded yet
        leftovers: list[Completion] = []
        while not self._completions.empty():
            leftovers.append(self._completions.get_nowait())
        if leftovers:
            await self._finish(leftovers)
        await self.release_unfinished()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._running = False
        log.info("dispatcher %s stopped after %d dispatches", self.worker_id, self.dispatched)

    async def release_unfinished(self) -> int:
        """Give the jobs this dispatcher claimed but did not finish back to the queue (pending,
        due now, no lease) and wake the other dispatchers, so one takes them at once instead
        of after the lease. Returns how many were released."""
        if not self._inflight:
            return 0
        ids = sorted(self._inflight)
        released = 0
        try:
            async with db.get_engine().begin() as conn:
                released = (await conn.execute(_RELEASE, {"ids": ids, "me": self.worker_id})).rowcount
                await conn.execute(text("SELECT pg_notify(:c, '')"), {"c": NOTIFY_CHANNEL})
            log.info("dispatcher %s released %d unfinished jobs", self.worker_id, released)
            for job_id in ids:
                log.info("job %s released to the queue (unfinished at stop)", job_id, extra={"job_id": job_id})
        except Exception as exc:  # the lease expiry recovers them later
            log.warning("dispatcher %s could not release %d unfinished jobs: %s", self.worker_id, len(ids), exc)
        self._inflight.clear()
        self._leased.clear()
        return released

    # ---------------------------------------------------------------------------------------
    # waking up

    async def _listen(self) -> None:
        delay = 0.5
        while not self._stopping:
            try:
                conn = await psycopg.AsyncConnection.connect(db.get_database_url(), autocommit=True)
                try:
                    await conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    self._wake.set()  # catch up with anything that arrived before LISTEN
                    delay = 0.5
                    async for _ in conn.notifies():
                        self._wake.set()
                finally:
                    with contextlib.suppress(Exception):
                        await conn.close()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("dispatcher %s: LISTEN failed (%s); polling every %.1fs meanwhile", self.worker_id, exc, self.settings.dispatch_poll_interval)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    async def _loop(self) -> None:
        errors = 0
        while not self._stopping:
            self._wake.clear()
            try:
                await self.sweep_if_due()
                claimed = await self.claim_and_dispatch()
                errors = 0
            except asyncio.CancelledError:
                raise
            except Exception:
                errors += 1
                log.exception("dispatcher %s: dispatch cycle failed", self.worker_id)
                await asyncio.sleep(min(0.5 * 2**errors, 30.0))
                continue
            if claimed and len(self._inflight) < self.capacity:
                continue  # there may be more due right now
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.settings.dispatch_poll_interval)

    # ---------------------------------------------------------------------------------------
    # claiming and handing over

    async def claim_and_dispatch(self) -> int:
        """Claim up to the free capacity of due jobs and start handing them over."""
        limit = min(self.settings.dispatch_batch_size, self.capacity - len(self._inflight))
        if limit <= 0:
            return 0
        async with db.get_engine().begin() as conn:
            rows = (
                await conn.execute(
                    _CLAIM, {"limit": limit, "me": self.worker_id, "lease": self.settings.in_process_lease_seconds}
                )
            ).all()
        if not rows:
            return 0
        self._idle.clear()
        for row in sorted(rows, key=lambda r: r.job_id):
            metrics.job_started(row.job_type, row.queued_seconds)
            self._inflight.add(row.job_id)
            self._leased.add(row.job_id)
            self._spawn(self._hand_over(row))
        self.dispatched += len(rows)
        return len(rows)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _hand_over(self, row: Any) -> None:
        job_id_var.set(row.job_id)  # this task's log lines carry the job id
        handler = row.handler if isinstance(row.handler, dict) else None
        kind = handler.get("type") if handler else None
        metrics.dispatch_attempt(kind)
        warning = public_url_warning(self.settings, kind)
        try:
            key = await self._keys.get(db.get_engine())
            token = callbacks.mint(key, row, callback_token_ttl(self.settings, handler))
            payload = build_payload(self.settings, row, token)
            if kind == "in_process":
                implementation = get_implementation(str(handler.get("value")))
                if implementation is None:
                    raise DispatchError(
                        "unknown_in_process_handler",
                        f"no in-process implementation named {handler.get('value')!r} is registered in this process",
                        retryable=False,
                    )
                await self._run_in_process(row, implementation, payload)
                return
            if kind == "lambda":
                async with self._aws_slots:
                    info = await asyncio.to_thread(self._aws.invoke_lambda, handler, payload)
            elif kind == "ecs_task":
                async with self._aws_slots:
                    info = await asyncio.to_thread(self._aws.run_ecs_task, handler, payload)
            else:
                raise DispatchError(
                    "invalid_handler", f"model version has no usable {row.job_type} handler (type {kind!r})", retryable=False
                )
        except asyncio.CancelledError:
            raise
        except DispatchError as exc:
            await self._dispatch_failed(row, exc, kind)
            return
        except Exception as exc:  # never lose a job to an unexpected error
            log.exception("dispatcher %s: handing over job %s failed", self.worker_id, row.job_id)
            await self._dispatch_failed(row, DispatchError("dispatch_exception", str(exc), details={"exception": exc.__class__.__name__}), kind)
            return
        self._leased.discard(row.job_id)
        try:
            async with db.get_engine().begin() as conn:
                await conn.execute(_DISPATCHED, {"job_id": row.job_id, "me": self.worker_id, "warning": warning})
        finally:
            self._done(row.job_id)
        log.info("job %s dispatched to %s (attempt %d): %s", row.job_id, kind, row.attempts, info)

    async def _run_in_process(self, row: Any, implementation: Any, payload: dict[str, Any]) -> None:
        loop = asyncio.get_running_loop()
        try:
            # the handler's own log lines carry the job id too
            run = functools.partial(contextvars.copy_context().run, _run_implementation, implementation, payload)
            output = await loop.run_in_executor(self._pool, run)
            completion = Completion(row.job_id, "success", output=output)
        except asyncio.CancelledError:
            raise
        except HandlerFailure as exc:
            completion = Completion(row.job_id, "failure", error=storable_error(exc.error))
        except Exception as exc:
            completion = Completion(
                row.job_id,
                "failure",
                error=storable_error(
                    {"code": "handler_exception", "message": str(exc) or exc.__class__.__name__, "exception": exc.__class__.__name__}
                ),
            )
        await self._completions.put(completion)

    async def _dispatch_failed(self, row: Any, exc: DispatchError, kind: str | None) -> None:
        error = {**exc.as_error(), "attempts": row.attempts, "backend": kind}
        metrics.dispatch_failure(kind, exc.retryable)
        try:
            if exc.retryable and row.attempts < self.settings.dispatch_max_attempts:
                delay = backoff_delay(self.settings, row.attempts)
                error["retrying_in_seconds"] = round(delay, 3)
                async with db.get_engine().begin() as conn:
                    await conn.execute(
                        _RETRY, {"job_id": row.job_id, "me": self.worker_id, "delay": delay, "error": json.dumps(error)}
                    )
                asyncio.get_running_loop().call_later(delay, self._wake.set)
                log.warning("job %s: dispatch attempt %d failed (%s); retrying in %.2fs", row.job_id, row.attempts, exc.message, delay)
            else:
                if exc.retryable:
                    error["message"] = f"gave up after {row.attempts} attempts: {exc.message}"
                await self._finish([Completion(row.job_id, "failure", error=error)])
                log.warning("job %s failed: %s", row.job_id, error["message"])
        finally:
            self._done(row.job_id)

    def _done(self, job_id: str) -> None:
        self._inflight.discard(job_id)
        self._leased.discard(job_id)
        if not self._inflight:
            self._idle.set()
        self._wake.set()  # capacity is free again

    # ---------------------------------------------------------------------------------------
    # ending in-process jobs, in batches

    async def _completer(self) -> None:
        while True:
            batch = [await self._completions.get()]
            while len(batch) < COMPLETION_BATCH and not self._completions.empty():
                batch.append(self._completions.get_nowait())
            try:
                await self._finish(batch)
            finally:
                for completion in batch:
                    self._done(completion.job_id)

    async def _finish(self, completions: list[Completion], *, attempt: int = 0) -> None:
        """End jobs through the completion logic. A failing batch is retried job by job, so one
        bad job never blocks the others; a job that still cannot be ended is tried once more as
        it is (the failure may have been transient: a deadlock, a dropped connection), then
        recorded as a failure ``unrecordable_result`` so it does not sit in ``started`` until
        its lease expires and run again only to fail the same way. If even that cannot be
        written (the database is down), the lease expiry recovers the job later."""
        try:
            async with db.sessionmaker()() as session, session.begin():
                outcomes = await finish_jobs(session, completions)
        except Exception as exc:
            if len(completions) > 1:
                for completion in completions:
                    await self._finish([completion])
                return
            completion = completions[0]
            if attempt == 0:
                await self._finish([completion], attempt=1)
                return
            log.exception("dispatcher %s: could not record the end of job %s", self.worker_id, completion.job_id)
            if attempt == 1:
                await self._finish(
                    [
                        Completion(
                            completion.job_id,
                            "failure",
                            error={
                                "code": "unrecordable_result",
                                "message": f"the handler's result could not be recorded ({exc.__class__.__name__})",
                                "reported_status": completion.status,
                            },
                        )
                    ],
                    attempt=2,
                )
            return
        for outcome in outcomes.values():
            if outcome.result == "conflict":
                log.warning("job %s had already ended as %s; result discarded", outcome.job_id, outcome.status)

    async def _renewer(self) -> None:
        interval = max(self.settings.in_process_lease_seconds / 3, 0.05)
        while True:
            await asyncio.sleep(interval)
            if not self._leased:
                continue
            try:
                async with db.get_engine().begin() as conn:
                    await conn.execute(
                        _RENEW,
                        {"ids": sorted(self._leased), "me": self.worker_id, "lease": self.settings.in_process_lease_seconds},
                    )
            except Exception as exc:
                log.warning("dispatcher %s: lease renewal failed: %s", self.worker_id, exc)

    # ---------------------------------------------------------------------------------------
    # sweeps

    async def sweep_if_due(self) -> None:
        now = time.monotonic()
        if now - self._last_sweep >= self.settings.dispatch_sweep_interval:
            self._last_sweep = now
            await self.sweep()

    async def sweep(self) -> dict[str, int]:
        """End started jobs that timed out; requeue jobs whose lease expired (their dispatcher
        died), or fail them when they used up their attempts."""
        s = self.settings
        async with db.sessionmaker()() as session, session.begin():
            timed_out = (await session.execute(_TIMED_OUT, {"timeout": s.job_timeout_seconds})).all()
            await _fail_all(
                session,
                timed_out,
                lambda r: {
                    "code": "timed_out",
                    "message": f"timed out: the handler did not report back within {r.timeout:g} seconds",
                    "timeout_seconds": r.timeout,
                    "attempts": r.attempts,
                    "started_at": r.started_at.isoformat(),
                },
            )
            requeued = (await session.execute(_REQUEUE_EXPIRED, {"max_attempts": s.dispatch_max_attempts})).all()
            exhausted = (await session.execute(_EXPIRED_EXHAUSTED, {"max_attempts": s.dispatch_max_attempts})).all()
            await _fail_all(
                session,
                exhausted,
                lambda r: {
                    "code": "lease_expired",
                    "message": f"gave up after {r.attempts} attempts: the dispatcher running the job stopped renewing its lease",
                    "attempts": r.attempts,
                    "previous_dispatcher": r.locked_by,
                },
            )
            if requeued:
                await notify_new_jobs(session)
        counts = {"timed_out": len(timed_out), "requeued": len(requeued), "exhausted": len(exhausted)}
        if any(counts.values()):
            log.warning("dispatcher %s sweep: %s", self.worker_id, counts)
        return counts

    # ---------------------------------------------------------------------------------------
    # for tests and scripts

    async def drain(self, timeout: float) -> int:
        """Claim and run due jobs until none is due and nothing is in flight."""
        deadline = time.monotonic() + timeout
        total = 0
        while True:
            self._wake.clear()
            claimed = await self.claim_and_dispatch()
            total += claimed
            if not claimed and not self._inflight:
                return total
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"jobs still running after {timeout}s ({len(self._inflight)} in flight)")
            if not claimed:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=min(remaining, 0.5))


async def dispatch_until_idle(settings: Settings, *, name: str = "test", timeout: float = 10.0) -> int:
    """Claim and run every due job (and the jobs they trigger), waiting for in-process ones to
    end; return how many dispatches happened. Raises TimeoutError if work remains after
    ``timeout`` seconds. Needs an initialised engine (``pie.db.init_engine``)."""
    dispatcher = Dispatcher(settings, name=name)
    dispatcher._start_workers()
    try:
        return await dispatcher.drain(timeout)
    finally:
        await dispatcher.stop(grace=1.0)
