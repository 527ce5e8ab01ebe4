"""The dispatcher: moves jobs from the ``jobs`` table (a transactional outbox) to their handlers.

A pipeline of three independent steps, each on its own cadence, so no step waits on another:

1. **claim**: due pending jobs are claimed with ``FOR UPDATE SKIP LOCKED`` and marked ``started``
   (attempts+1, ``locked_by``, a lease) by one autocommit statement on the dispatcher's own
   connection, so any number of dispatchers on any number of machines can share the database and
   each job is claimed by exactly one of them. A dispatcher claims no more in-process jobs
   that need a worker than it has free workers (the built-ins, which run on the event loop at
   once, need none: a batch of them is one claim), and claims again as soon as workers are free
   — while earlier results are still being recorded;
2. **hand over**: each claimed job gets a payload with its callback token (:mod:`pie.callbacks`,
   signed by a per-key :class:`pie.callbacks.Signer`) and goes to the backend of its version's
   handler for its job_type: Lambda ``Invoke`` (``Event``) or ECS ``RunTask`` in a bounded pool of
   threads (``PIE_DISPATCH_AWS_CONCURRENCY`` calls at once, so an AWS round trip does not cap the
   rate), after which the lease is cleared and the job stays ``started`` until the completion
   callback; in-process implementations run on the event loop (``async def`` ones, and the
   built-ins, which take microseconds) or in the worker thread pool (plain functions), whose
   results come back to the loop in batches (one wake-up for all that ended together);
3. **record**: results are recorded in batches by a recorder task on a connection of its own,
   through :func:`pie.jobs.logic.finish_jobs` (the same code the completion route uses: one
   statement for a batch of plain jobs), at once when nothing else runs, else after at most
   ``RECORD_LINGER`` or ``RECORD_BATCH`` results; AWS hand-offs are marked the same way.

A failed dispatch goes back to ``pending`` with exponential backoff and jitter, and after
``dispatch_max_attempts`` ends in ``failure`` with a structured error.

Dispatchers wake on ``LISTEN pie_jobs`` (``create_job`` notifies at commit) with a polling
fallback. Every ``dispatch_sweep_interval`` seconds a dispatcher also ends started jobs older than
their handler's ``timeout_seconds`` (else ``job_timeout_seconds``) ("timed out") and returns jobs whose lease expired (their dispatcher
died) to the queue.

Cancellation (spec 15.4, :mod:`pie.jobs.cancel`): dispatchers also ``LISTEN pie_job_cancel``. An
in-process job of this dispatcher that was cancelled gets its cancel flag raised (its handler sees
``pie.dispatch.inprocess.cancelled()``; the sweep also looks for cancelled running jobs, in case
a notification was missed); its result, if it finishes anyway, is discarded by ``finish_jobs``.
ECS tasks to stop are rows of ``task_stops``: a dispatcher claims due ones (a lease, so no
transaction stays open during the AWS call), calls ``StopTask`` and deletes the row, retrying
failures with backoff up to ``dispatch_max_attempts`` (then the job gets a warning). A task that
ECS started for a job that had ended meanwhile (a cancel racing the hand-over) is stopped too.

Liveness: every dispatcher registers in the ``dispatchers`` table and heartbeats there every
``dispatch_heartbeat_interval`` seconds. The sweep requeues the leased jobs of dispatchers whose
heartbeat is older than ``dispatch_dead_after`` (or, on the same host, whose process is gone —
so a restarted ``pie serve`` recovers its predecessor's jobs at once), instead of waiting for the
lease. A dispatcher only judges others after its own heartbeats have succeeded for
``dispatch_dead_after`` seconds in a row, so after a database outage (when every heartbeat is
stale) nobody requeues the jobs of dispatchers that are alive.

Recording an in-process result retries transient database errors with backoff for as long as the
job's lease lasts (the lease is extended while it retries), so a database blip never makes a job
run twice. docs/dispatcher.md describes the pipeline, its guarantees and its tuning.

The code, one concern per module, each class extending the one below it:
``state`` (settings, pools, the jobs in hand) < ``liveness`` (registration, heartbeat, dead peers)
< ``recording`` (results and hand-offs in batches, lease renewal) < ``claiming`` (claims, signing,
hand-over) < ``sweeper`` (time-outs, expired leases, cancellation, ECS task stops) < this module's
``Dispatcher`` (start, stop, the loop and the listener). The SQL is in ``statements``; what a
handler's result becomes (storable JSON, backoff, transient errors) in ``outcomes``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time

import psycopg
from sqlalchemy import text

from pie import db
from pie.config import Settings
from pie.dispatch.claiming import CLAIM_COALESCE
from pie.dispatch.outcomes import is_transient_db_error
from pie.dispatch.statements import _RELEASE, _UNREGISTER
from pie.dispatch.sweeper import Sweeping
from pie.dispatch.threads import DaemonThreadPool
from pie.jobs.channels import CANCEL_CHANNEL, NOTIFY_CHANNEL
from pie.jobs.logic import Completion
from pie.schemagate import SCHEMA_LOG_SECONDS, SCHEMA_WAIT_SECONDS, is_schema_error

log = logging.getLogger("pie.dispatch")

# at stop, how long the loop may take to end its current cycle before it is cancelled
STOP_LOOP_WAIT = 5.0
# A failed cycle (the database is away) is tried again after 0.5, 1, 2, 4 s, then every 5 s: once
# the database is back, dispatching resumes within seconds (it was up to 30 s: a queue standing
# still for half a minute after an outage ended)
LOOP_BACKOFF_MAX = 5.0


class Dispatcher(Sweeping):
    # ---------------------------------------------------------------------------------------
    # lifecycle

    def _start_workers(self) -> None:
        loop = asyncio.get_running_loop()
        self._pool = DaemonThreadPool(max_workers=self.workers, thread_name_prefix="pie-job")
        self._pool.deliver_to(loop, self._on_results)
        self._aws_pool = DaemonThreadPool(max_workers=self.aws_concurrency, thread_name_prefix="pie-aws")
        self._aws_pool.deliver_to(loop, self._on_handed)
        self._background += [
            asyncio.create_task(self._recorder(), name=f"{self.name}-recorder"),
            asyncio.create_task(self._renewer(), name=f"{self.name}-lease-renewer"),
            asyncio.create_task(self._heartbeater(), name=f"{self.name}-heartbeat"),
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
            if task.get_name().endswith("-listener"):
                task.cancel()
        # the loop ends after its current cycle (claiming nothing more): a claim is one short
        # transaction that also signs the tokens, better finished than broken off (its jobs
        # are then handed over, or released below); cancelled only if it does not end soon
        self._wake.set()
        loops = [task for task in self._background if task.get_name().endswith("-loop")]
        if loops:
            _, unfinished = await asyncio.wait(loops, timeout=min(grace, STOP_LOOP_WAIT))
            for task in unfinished:
                task.cancel()
        if self._inflight:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout=grace)
        for task in list(self._tasks):
            task.cancel()
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._background, return_exceptions=True)
        if self._recording or self._marking:
            # the recorder was cancelled mid-statement: its connection's state is unknown
            await self._close_record_connection()
        # whatever ended or was handed over but was not recorded yet (with retries for at most
        # the grace period): a hand-off AWS accepted must not be released and run again
        handed, self._handed = self._marking + self._handed, []
        self._marking = []
        if handed:
            with contextlib.suppress(Exception):
                await self._mark_dispatched(handed)
            for row, _, _ in handed:
                self._done(row.job_id)
        leftovers: list[Completion] = self._recording + self._results
        self._recording, self._results = [], []
        if leftovers:
            with contextlib.suppress(Exception):
                await self._finish(leftovers, retry_until=time.monotonic() + grace)
            for completion in leftovers:
                self._done(completion.job_id)
        await self._close_claim_connection()
        await self.release_unfinished()
        await self._close_record_connection()
        if self._registered:
            with contextlib.suppress(Exception):
                async with db.get_engine().begin() as conn:
                    await conn.execute(_UNREGISTER, {"me": self.worker_id})
            self._registered = False
        for pool in (self._pool, self._aws_pool):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        self._running = False
        log.info("dispatcher %s stopped after %d dispatches", self.worker_id, self.dispatched)

    async def release_unfinished(self) -> int:
        """Give every job this dispatcher claimed and has not finished back to the queue at
        once (pending, due now, no lease), so another dispatcher runs it without waiting for a
        lease or heartbeat to expire. Called by :meth:`stop` after the grace period; safe to
        call again. Returns how many jobs were released."""
        ids = sorted(self._inflight)
        if not ids:
            return 0
        released = 0
        try:
            async with db.get_engine().begin() as conn:
                released = (await conn.execute(_RELEASE, {"ids": ids, "me": self.worker_id})).rowcount
                await conn.execute(text("SELECT pg_notify(:c, '')"), {"c": NOTIFY_CHANNEL})
            log.info("dispatcher %s released %d unfinished jobs", self.worker_id, released)
            for job_id in ids:
                log.info("job %s released to the queue (unfinished at stop)", job_id, extra={"job_id": job_id})
        except Exception as exc:  # the database is away: the heartbeat expiry recovers them
            log.warning("dispatcher %s could not release %d unfinished jobs: %s", self.worker_id, len(ids), exc)
        for job_id in ids:
            self._done(job_id)
        return released

    # ---------------------------------------------------------------------------------------
    # waking up

    async def _listen(self) -> None:
        delay = 0.5
        while not self._stopping:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    db.get_database_url(),
                    autocommit=True,
                    connect_timeout=max(1, math.ceil(self.settings.db_connect_timeout or 10)),
                )
                try:
                    await conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    await conn.execute(f"LISTEN {CANCEL_CHANNEL}")
                    self._wake_all()  # catch up with anything that arrived before LISTEN
                    self._stops_due = True
                    delay = 0.5
                    async for notification in conn.notifies():
                        if notification.channel == CANCEL_CHANNEL:
                            self.on_cancelled([notification.payload])
                        else:
                            self._wake_all()
                finally:
                    with contextlib.suppress(Exception):
                        await conn.close()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning(
                    "dispatcher %s: LISTEN failed (%s); polling every %.1fs meanwhile",
                    self.worker_id,
                    exc,
                    self.settings.dispatch_poll_interval,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    async def _loop(self) -> None:
        errors = 0
        while not self._stopping:
            self._wake.clear()
            await self._gather_free_workers()
            try:
                await self.sweep_if_due()
                if self._stops_due and (self._stopper is None or self._stopper.done()):
                    # in the background: a slow StopTask never holds up claiming
                    self._stopper = asyncio.create_task(self._stop_tasks_logged(), name=f"{self.name}-stopper")
                    self._tasks.add(self._stopper)
                    self._stopper.add_done_callback(self._tasks.discard)
                claimed = await self.claim_and_dispatch(eager=False)
                errors = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if is_schema_error(exc):  # not migrated yet: wait quietly, no traceback
                    self._schema_missing(exc)
                    await asyncio.sleep(SCHEMA_WAIT_SECONDS)
                    continue
                errors += 1
                if is_transient_db_error(exc):  # the database is away: no traceback per cycle
                    log.warning(
                        "dispatcher %s: dispatch cycle failed: %s", self.worker_id, str(exc).splitlines()[0][:200]
                    )
                else:
                    log.exception("dispatcher %s: dispatch cycle failed", self.worker_id)
                await asyncio.sleep(min(0.5 * 2**errors, LOOP_BACKOFF_MAX))
                continue
            if claimed and self._more_due:
                continue  # there may be more due right now
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.settings.dispatch_poll_interval)
            except TimeoutError:
                self._check_remote = True  # the polling fallback looks for every kind of job
                self._check_local = True

    def _schema_missing(self, exc: BaseException) -> None:
        now = time.monotonic()
        if self._schema_logged_at is None or now - self._schema_logged_at >= SCHEMA_LOG_SECONDS:
            self._schema_logged_at = now
            log.warning(
                "dispatcher %s: the database schema is not migrated (%s); dispatching waits for `pie migrate`",
                self.worker_id,
                str(getattr(exc, "orig", exc)).splitlines()[0][:200],
            )

    async def _gather_free_workers(self) -> None:
        """Some workers just became free while others still run: wait up to ``CLAIM_COALESCE``
        for those to end too (instant handlers end together), so one claim serves them all."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CLAIM_COALESCE
        while 0 < len(self._busy) < self.workers and not self._stopping:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=remaining)

    # ---------------------------------------------------------------------------------------
    # for tests and scripts

    async def drain(self, timeout: float) -> int:
        """Claim and run due jobs until none is due and nothing is in flight."""
        deadline = time.monotonic() + timeout
        total = 0
        while True:
            self._wake.clear()
            if self._stops_due:
                await self.stop_tasks()
            claimed = await self.claim_and_dispatch()
            total += claimed
            if not claimed and not self._inflight:
                if self._checked_remote:
                    return total
                self._check_remote = True  # nothing left: look for every kind once more
                self._check_local = True
                continue
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
