"""Recording results and hand-offs in batches, on a connection of its own, through
``pie.jobs.logic.finish_jobs``; renewing the leases of running in-process jobs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Sequence
from typing import Any

import psycopg

from pie import db
from pie.dispatch.liveness import Liveness
from pie.dispatch.outcomes import is_transient_db_error
from pie.dispatch.statements import _CONNECTION_SETUP, _DISPATCHED, _ORPHAN_TASK, _RENEW
from pie.jobs.logic import Completion, finish_jobs

log = logging.getLogger("pie.dispatch")

# at most this many results per recording statement
RECORD_BATCH = 500


# While other in-process jobs are running (or more are due), the recorder waits this long for
# their results too, so instant handlers end in one statement per several claims (not one per
# job); a result that ends while nothing else runs is recorded at once. Workers and claims go on
# meanwhile.
RECORD_LINGER = 0.002


RECORD_LINGER_MAX = 0.01


class Recording(Liveness):
    # ---------------------------------------------------------------------------------------
    # recording results and hand-offs, in batches, on a connection of its own

    async def _recorder(self) -> None:
        while True:
            await self._record_wake.wait()
            # more results are on their way: wait for them (a batch's worth, RECORD_LINGER_MAX
            # at most), so a busy dispatcher ends many jobs per statement
            lingered = 0.0
            while (
                (self._busy or self._backlog)
                and len(self._results) < self._record_min
                and lingered < RECORD_LINGER_MAX
                and not self._stopping
            ):
                await asyncio.sleep(RECORD_LINGER)
                lingered += RECORD_LINGER
            self._record_wake.clear()
            handed, self._handed = self._handed, []
            if handed:
                self._marking = handed  # if stop() cancels us mid-way, it marks these itself
                try:
                    await self._mark_dispatched(handed)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # their leases recover them
                    log.warning("dispatcher %s: marking %d hand-offs failed: %s", self.worker_id, len(handed), exc)
                self._marking = []
                for row, _, _ in handed:
                    self._done(row.job_id)
            while self._results:
                batch, self._results = self._results[:RECORD_BATCH], self._results[RECORD_BATCH:]
                self._recording = batch  # if stop() cancels us mid-way, it records these itself
                try:
                    await self._finish(batch)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("dispatcher %s: recording %d results failed", self.worker_id, len(batch))
                self._recording = []
                for completion in batch:
                    self._done(completion.job_id)

    async def _record_connection(self) -> psycopg.AsyncConnection[Any]:
        conn = self._record_conn
        if conn is None or conn.closed:
            conn = await db.connect(self.settings, autocommit=True)
            await conn.execute(_CONNECTION_SETUP)
            self._record_conn = conn
        return conn

    async def _close_record_connection(self) -> None:
        conn, self._record_conn = self._record_conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()

    async def _drop_record_connection_if_broken(self) -> None:
        conn = self._record_conn
        if conn is not None and (conn.closed or conn.broken):
            await self._close_record_connection()

    async def _mark_dispatched(self, handed: list[tuple[Any, str | None, dict[str, Any]]]) -> None:
        """One statement for a batch of accepted hand-offs (tried once more on a new connection
        when the old one turns out broken)."""
        tasks = {
            row.job_id: {"cluster": info["cluster"], "task_arn": info["task_arn"]}
            for row, _, info in handed
            if isinstance(info, dict) and info.get("backend") == "ecs_task" and isinstance(info.get("task_arn"), str)
        }
        params = {
            "ids": [row.job_id for row, _, _ in handed],
            "warnings": [w for _, w, _ in handed],
            "ecs_tasks": [json.dumps(tasks[row.job_id]) if row.job_id in tasks else None for row, _, _ in handed],
            "me": self.worker_id,
        }
        marked: set[str] = set()
        for retry in (False, True):
            try:
                conn = await self._record_connection()
                marked = {r[0] for r in await (await conn.execute(_DISPATCHED, params)).fetchall()}
                break
            except psycopg.OperationalError:
                await self._drop_record_connection_if_broken()
                if retry:
                    raise
        orphans = [(job_id, task) for job_id, task in tasks.items() if job_id not in marked]
        if orphans:
            # the job ended (was cancelled) while ECS was starting its task: stop the task
            async with db.get_engine().begin() as sa_conn:
                for job_id, task in orphans:
                    await sa_conn.execute(
                        _ORPHAN_TASK,
                        {**task, "job_id": job_id, "reason": "the PIE job had ended when its task started"},
                    )
                    log.warning("job %s ended while its ECS task %s started: stopping it", job_id, task["task_arn"])
            self._stops_due = True
            self._wake.set()
        for row, _, info in handed:
            handler = row.handler if isinstance(row.handler, dict) else {}
            log.info(
                "job %s dispatched to %s (attempt %d): %s",
                row.job_id,
                handler.get("type"),
                row.attempts,
                info,
                extra={"job_id": row.job_id},
            )

    def _recording_deadline(self, completions: list[Completion]) -> float:
        """Until when recording these results may be retried: the earliest end of their leases
        as this dispatcher knows it (past it a peer may requeue the job), less a safety margin."""
        ends = [self._lease_until[c.job_id] for c in completions if c.job_id in self._lease_until]
        if not ends:
            return time.monotonic()
        return min(ends) - min(1.0, self.settings.in_process_lease_seconds / 10)

    async def _finish(
        self, completions: list[Completion], *, attempt: int = 0, retry_until: float | None = None
    ) -> None:
        """End jobs through the completion logic (on the recorder's connection).

        A transient database error (the server is down or restarting, a broken connection, a
        timeout, a conflict) is retried with exponential backoff for as long as the jobs' leases
        last; the lease is extended whenever the database answers again, so an outage shorter
        than the lease never makes a job run twice. Other errors: a failing batch is retried job
        by job, so one bad job never blocks the others; a job that still cannot be ended is
        tried once more as it is, then recorded as a failure ``unrecordable_result`` so it does
        not sit in ``started`` until its lease expires and run again only to fail the same way.
        If even that cannot be written, the lease expiry recovers the job later."""
        delay = 0.05
        while True:
            try:
                conn = await self._record_connection()
                outcomes = await finish_jobs(conn, completions)
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                await self._drop_record_connection_if_broken()
                if not is_transient_db_error(exc):
                    return await self._finish_fallback(completions, exc, attempt)
                until = retry_until if retry_until is not None else self._recording_deadline(completions)
                if time.monotonic() + delay >= until:
                    log.error(
                        "dispatcher %s: could not record %d results before their leases end (%s); "
                        "the lease expiry will recover them",
                        self.worker_id,
                        len(completions),
                        exc,
                    )
                    return None
                log.warning(
                    "dispatcher %s: recording %d results failed (%s: %s); retrying in %.2fs",
                    self.worker_id,
                    len(completions),
                    exc.__class__.__name__,
                    str(exc).splitlines()[0][:200],
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                await self._renew([c.job_id for c in completions])
        for outcome in outcomes.values():
            if outcome.result == "conflict" and outcome.cancelled:
                log.info("job %s was cancelled; its handler's result is discarded", outcome.job_id)
            elif outcome.result == "conflict":
                log.warning("job %s had already ended as %s; result discarded", outcome.job_id, outcome.status)
        return None

    async def _finish_fallback(self, completions: list[Completion], exc: Exception, attempt: int) -> None:
        if len(completions) > 1:
            for completion in completions:
                await self._finish([completion])
            return
        completion = completions[0]
        if attempt == 0:
            await self._finish([completion], attempt=1)
            return
        log.error("dispatcher %s: could not record the end of job %s: %r", self.worker_id, completion.job_id, exc)
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

    async def _renew(self, ids: Sequence[str]) -> bool:
        """Extend the leases of ``ids`` (those still ours); False if the database did not answer."""
        ids = sorted(i for i in ids if i in self._leased)
        if not ids:
            return True
        lease = self.settings.in_process_lease_seconds
        started = time.monotonic()
        try:
            async with db.get_engine().begin() as conn:
                await conn.execute(_RENEW, {"ids": ids, "me": self.worker_id, "lease": lease})
        except Exception as exc:
            log.warning("dispatcher %s: lease renewal failed: %s", self.worker_id, exc)
            return False
        for job_id in ids:
            if job_id in self._lease_until:
                self._lease_until[job_id] = started + lease
        return True

    async def _renewer(self) -> None:
        interval = max(self.settings.in_process_lease_seconds / 3, 0.05)
        while True:
            await asyncio.sleep(interval)
            if self._leased:
                await self._renew(list(self._leased))
