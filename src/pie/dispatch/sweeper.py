"""The sweep (timed-out jobs, expired leases, the jobs of dead dispatchers) and cancellation
(raising the cancel flag of running in-process jobs, stopping ECS tasks)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from pie import db
from pie.dispatch.backends import DispatchError
from pie.dispatch.claiming import Claiming
from pie.dispatch.liveness import _process_gone
from pie.dispatch.outcomes import backoff_delay
from pie.dispatch.statements import (
    _CANCELLED,
    _CLAIM_STOPS,
    _EXPIRED_EXHAUSTED,
    _FORGET,
    _ORPHANS,
    _REQUEUE_EXPIRED,
    _REQUEUE_ORPHANS,
    _SAME_HOST,
    _SILENT,
    _STOP_LATER,
    _STOP_WARNING,
    _STOPPED,
    _TIMED_OUT,
)
from pie.jobs.channels import notify_new_jobs
from pie.jobs.logic import Completion, finish_jobs

log = logging.getLogger("pie.dispatch")

STOP_LEASE_SECONDS = 120.0


async def _fail_all(session: Any, rows: Sequence[Any], error_for: Callable[[Any], dict[str, Any]]) -> None:
    """End every job of ``rows`` in failure with ``error_for(row)`` (through the one completion path)."""
    if rows:
        await finish_jobs(session, [Completion(r.job_id, "failure", error=error_for(r)) for r in rows])


class Sweeping(Claiming):
    # ---------------------------------------------------------------------------------------
    # sweeps

    async def sweep_if_due(self) -> None:
        now = time.monotonic()
        if now - self._last_sweep >= self.settings.dispatch_sweep_interval:
            self._last_sweep = now
            await self.sweep()
            await self._look_for_cancellations()
            self._stops_due = True

    # ---------------------------------------------------------------------------------------
    # cancellation

    def on_cancelled(self, job_ids: Sequence[str]) -> None:
        """Jobs were cancelled (``NOTIFY pie_job_cancel``): raise the cancel flag of those this
        dispatcher runs in-process, and look for ECS tasks to stop."""
        for job_id in job_ids:
            context = self._contexts.get(job_id)
            if context is not None and not context.cancelled():
                context.cancel()
                log.info("job %s was cancelled: its in-process handler is asked to stop", job_id)
        self._stops_due = True
        self._wake.set()

    async def _look_for_cancellations(self) -> None:
        """The NOTIFY's fallback (a notification lost while LISTEN reconnected): raise the flags
        of running in-process jobs that were cancelled."""
        running = sorted(job_id for job_id, c in self._contexts.items() if not c.cancelled())
        if not running:
            return
        try:
            async with db.get_engine().connect() as conn:
                cancelled = list((await conn.execute(_CANCELLED, {"ids": running})).scalars())
        except Exception as exc:
            log.warning("dispatcher %s: looking for cancelled jobs failed: %s", self.worker_id, exc)
            return
        if cancelled:
            self.on_cancelled(cancelled)

    async def stop_tasks(self) -> int:
        """Stop the due ECS tasks of ``task_stops`` (``StopTask``); returns how many stopped.
        A failure is retried with backoff up to ``dispatch_max_attempts``; a task ECS does not
        know (any more) needs no stop; giving up leaves a warning on the job."""
        self._stops_due = False
        async with db.get_engine().begin() as conn:
            rows = (await conn.execute(_CLAIM_STOPS, {"lease": STOP_LEASE_SECONDS, "n": self.aws_concurrency})).all()
        if not rows:
            return 0
        self._stops_due = len(rows) == self.aws_concurrency  # there may be more due

        async def stop(row: Any) -> bool:
            async with self._aws_slots:
                try:
                    await asyncio.to_thread(self._aws.stop_ecs_task, row.cluster, row.task_arn, row.reason)
                except DispatchError as exc:
                    return await self._stop_failed(row, exc)
                except Exception as exc:  # never leave the row to the lease for an unexpected error
                    return await self._stop_failed(row, DispatchError("stop_exception", str(exc)))
            async with db.get_engine().begin() as conn:
                await conn.execute(_STOPPED, {"task_arn": row.task_arn})
            log.info("job %s: ECS task %s stopped (%s)", row.job_id, row.task_arn, row.reason)
            return True

        results = await asyncio.gather(*(stop(r) for r in rows), return_exceptions=True)
        for row, result in zip(rows, results):
            if isinstance(result, BaseException):
                log.warning("job %s: stopping ECS task %s failed: %s", row.job_id, row.task_arn, result)
        return sum(1 for r in results if r is True)

    async def _stop_failed(self, row: Any, exc: DispatchError) -> bool:
        s = self.settings
        error = {**exc.as_error(), "attempts": row.attempts}
        async with db.get_engine().begin() as conn:
            if exc.retryable and row.attempts < s.dispatch_max_attempts:
                delay = backoff_delay(s, row.attempts)
                await conn.execute(_STOP_LATER, {"task_arn": row.task_arn, "delay": delay, "error": json.dumps(error)})
                asyncio.get_running_loop().call_later(delay, self._stop_due_again)
                log.warning(
                    "job %s: StopTask of %s failed (%s); retrying in %.2fs",
                    row.job_id,
                    row.task_arn,
                    exc.message,
                    delay,
                )
                return False
            await conn.execute(_STOPPED, {"task_arn": row.task_arn})
            if exc.retryable:
                await conn.execute(
                    _STOP_WARNING,
                    {
                        "job_id": row.job_id,
                        "warning": f"the ECS task {row.task_arn} could not be stopped after {row.attempts} "
                        f"attempts: {exc.message}",
                    },
                )
        if exc.retryable:
            log.error("job %s: gave up stopping ECS task %s: %s", row.job_id, row.task_arn, exc.message)
        else:  # ECS does not know the task (any more): nothing left to stop
            log.info("job %s: ECS task %s needs no stop: %s", row.job_id, row.task_arn, exc.message)
        return not exc.retryable

    async def _stop_tasks_logged(self) -> None:
        try:
            await self.stop_tasks()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._stops_due = True  # try again on the next cycle
            log.warning("dispatcher %s: stopping ECS tasks failed: %s", self.worker_id, str(exc).splitlines()[0][:200])

    def _stop_due_again(self) -> None:
        self._stops_due = True
        self._wake.set()

    async def _dead_peers(self, session: Any) -> tuple[list[str], list[str]]:
        """(dead dispatcher ids, the subset known dead because their process is gone)."""
        gone = [
            row.id
            for row in (await session.execute(_SAME_HOST, {"host": self.host, "me": self.worker_id})).all()
            if _process_gone(row.pid)
        ]
        silent: list[str] = []
        if self._judges_peers():
            silent = list(
                (
                    await session.execute(
                        _SILENT, {"me": self.worker_id, "dead_after": self.settings.dispatch_dead_after}
                    )
                ).scalars()
            )
        return sorted(set(gone) | set(silent)), gone

    async def sweep(self) -> dict[str, int]:
        """End started jobs that timed out; requeue jobs whose lease expired or whose dispatcher
        died (stopped heartbeating, or its process is gone), or fail them when they used up
        their attempts."""
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
            dead, gone = await self._dead_peers(session)
            orphans = (
                await session.execute(_ORPHANS, {"me": self.worker_id, "dead": dead, "judge": self._judges_peers()})
            ).all()
            retry = [r.job_id for r in orphans if r.attempts < s.dispatch_max_attempts]
            if retry:
                await session.execute(_REQUEUE_ORPHANS, {"ids": retry})
            orphans_exhausted = [r for r in orphans if r.attempts >= s.dispatch_max_attempts]
            await _fail_all(
                session,
                orphans_exhausted,
                lambda r: {
                    "code": "dispatcher_died",
                    "message": f"gave up after {r.attempts} attempts: the dispatcher running the job stopped heartbeating",
                    "attempts": r.attempts,
                    "previous_dispatcher": r.locked_by,
                },
            )
            if dead:
                await session.execute(_FORGET, {"ids": dead, "gone": gone, "dead_after": s.dispatch_dead_after})
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
            if requeued or retry:
                await notify_new_jobs(session)
        counts = {
            "timed_out": len(timed_out),
            "requeued": len(requeued) + len(retry),
            "exhausted": len(exhausted) + len(orphans_exhausted),
        }
        if any(counts.values()) or dead:
            log.warning("dispatcher %s sweep: %s; dead dispatchers: %s", self.worker_id, counts, dead)
        return counts
