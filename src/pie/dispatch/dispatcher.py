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
"""

from __future__ import annotations

import asyncio
import contextlib
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
from psycopg.rows import namedtuple_row
from sqlalchemy import text

from pie import callbacks, db, metrics
from pie.config import Settings
from pie.dispatch.backends import AwsBackends, DispatchError, public_url_warning
from pie.dispatch.inprocess import (
    HandlerFailure,
    JobContext,
    await_in_context,
    get_registered,
    inline_names,
    run_in_context,
)
from pie.dispatch.threads import DaemonThreadPool
from pie.jobs.channels import CANCEL_CHANNEL, NOTIFY_CHANNEL, notify_new_jobs
from pie.jobs.logic import Completion, finish_jobs
from pie.jobs.payload import build_payload, callback_token_ttl
from pie.logconfig import job_id_var
from pie.schemagate import SCHEMA_LOG_SECONDS, SCHEMA_WAIT_SECONDS, is_schema_error
from pie.schemas import unstorable_json

log = logging.getLogger("pie.dispatch")

# characters PostgreSQL text/jsonb cannot hold
_UNSTORABLE_TEXT = re.compile("[\x00\ud800-\udfff]")
# at most this many results per recording statement
RECORD_BATCH = 500
# While other in-process jobs are running (or more are due), the recorder waits this long for
# their results too, so instant handlers end in one statement per several claims (not one per
# job); a result that ends while nothing else runs is recorded at once. Workers and claims go on
# meanwhile.
RECORD_LINGER = 0.002
RECORD_LINGER_MAX = 0.01
# A worker frees while others still run the jobs of the same claim (instant handlers end within
# microseconds of each other): the claim waits this long for them, so one claim transaction
# serves every free worker instead of one claim for the first and another for the rest.
CLAIM_COALESCE = 0.001
# An inline (built-in) handler whose job carries more than this many stored bytes of input and
# features runs in the worker pool instead, so a large payload never holds up the event loop.
INLINE_MAX_PAYLOAD_BYTES = 16 * 1024
# at stop, how long the loop may take to end its current cycle before it is cancelled
STOP_LOOP_WAIT = 5.0
# A failed cycle (the database is away) is tried again after 0.5, 1, 2, 4 s, then every 5 s: once
# the database is back, dispatching resumes within seconds (it was up to 30 s: a queue standing
# still for half a minute after an outage ended)
LOOP_BACKOFF_MAX = 5.0

_RENEW = text(
    """
    UPDATE jobs SET lease_expires_at = now() + make_interval(secs => :lease)
    WHERE job_id = ANY(CAST(:ids AS text[])) AND status = 'started' AND locked_by = :me
      AND lease_expires_at IS NOT NULL
    """
)
# AWS handlers accepted these jobs: no lease any more, the time-out applies from now on (plus a
# warning when their callback cannot arrive, once; and the ECS task, so a cancel can stop it).
# One statement for a batch of hand-offs; it returns the jobs it marked (a job that is no longer
# this dispatcher's was cancelled meanwhile: its ECS task is stopped).
_DISPATCHED = """
    UPDATE jobs AS j SET lease_expires_at = NULL, error = NULL, updated_at = now(),
        ecs_task = CAST(b.ecs_task AS jsonb),
        warnings = CASE WHEN b.warning IS NULL OR j.warnings @> jsonb_build_array(b.warning) THEN j.warnings
                        ELSE j.warnings || jsonb_build_array(b.warning) END
    FROM unnest(CAST(%(ids)s AS text[]), CAST(%(warnings)s AS text[]), CAST(%(ecs_tasks)s AS text[]))
        AS b(job_id, warning, ecs_task)
    WHERE j.job_id = b.job_id AND j.status = 'started' AND j.locked_by = %(me)s
    RETURNING j.job_id
    """
# ECS started a task for a job that is no longer this dispatcher's (cancelled meanwhile): stop it
_ORPHAN_TASK = text(
    """
    INSERT INTO task_stops (task_arn, job_id, cluster, reason) VALUES (:task_arn, :job_id, :cluster, :reason)
    ON CONFLICT (task_arn) DO NOTHING
    """
)
# ECS tasks to stop: claim due ones with a lease (the row is due again if this dispatcher dies)
_CLAIM_STOPS = text(
    """
    UPDATE task_stops AS t SET attempts = t.attempts + 1, next_attempt_at = now() + make_interval(secs => :lease)
    FROM (SELECT task_arn FROM task_stops WHERE next_attempt_at <= now()
          ORDER BY next_attempt_at LIMIT :n FOR UPDATE SKIP LOCKED) AS due
    WHERE t.task_arn = due.task_arn
    RETURNING t.task_arn, t.job_id, t.cluster, t.reason, t.attempts
    """
)
_STOPPED = text("DELETE FROM task_stops WHERE task_arn = :task_arn")
_STOP_LATER = text(
    """
    UPDATE task_stops SET next_attempt_at = now() + make_interval(secs => :delay), last_error = CAST(:error AS jsonb)
    WHERE task_arn = :task_arn
    """
)
_STOP_WARNING = text(
    """
    UPDATE jobs SET warnings = warnings || jsonb_build_array(CAST(:warning AS text)), updated_at = now()
    WHERE job_id = :job_id
    """
)
# running jobs of this dispatcher that were cancelled (the fallback of the NOTIFY)
_CANCELLED = text("SELECT job_id FROM jobs WHERE job_id = ANY(CAST(:ids AS text[])) AND cancelled_at IS NOT NULL")
STOP_LEASE_SECONDS = 120.0
# A job waiting for another attempt is `pending` (not started, no error: spec 15.3); the failed
# attempt shows as the job's `dispatch` (dispatch_error). The requeues of the sweep below do the same.
_RETRY = text(
    """
    UPDATE jobs SET status = 'pending', locked_by = NULL, lease_expires_at = NULL, started_at = NULL,
        next_attempt_at = now() + make_interval(secs => :delay), dispatch_error = CAST(:error AS jsonb),
        error = NULL, updated_at = now()
    WHERE job_id = :job_id AND status = 'started' AND locked_by = :me
    """
)
# Claim due pending jobs: at most :local_limit with an in-process handler that needs a worker
# (the free workers of this dispatcher) and :remote_limit that need none (Lambda/ECS hand-offs,
# invalid handlers, and the :inline implementations, which run on the event loop at once) among
# the :lookahead oldest due jobs (so a long in-process backlog is not scanned on every cycle).
# SKIP LOCKED: rows another transaction holds are skipped, never waited for.
# The same statement reads the signing key (share-locked until the claim's transaction commits,
# after the tokens are signed: ``pie.callbacks``); one statement on the dispatcher's own connection.
_CLAIM_TEMPLATE = """
    WITH signing AS ({signing}), local_due AS (
        SELECT j.job_id FROM jobs AS j
        JOIN model_versions AS mv ON mv.model_id = j.model_id AND mv.version = j.model_version
        WHERE j.status = 'pending' AND j.next_attempt_at <= now() {local_window}
          AND (mv.handlers -> j.job_type ->> 'type') IS NOT DISTINCT FROM 'in_process'
          AND coalesce(mv.handlers -> j.job_type ->> 'value', '') <> ALL(%(inline)s)
        ORDER BY j.next_attempt_at
        LIMIT %(local_limit)s
        FOR UPDATE OF j SKIP LOCKED
    ), remote_due AS (
        SELECT j.job_id FROM jobs AS j
        JOIN model_versions AS mv ON mv.model_id = j.model_id AND mv.version = j.model_version
        WHERE j.status = 'pending' AND j.next_attempt_at <= now() {window}
          AND ((mv.handlers -> j.job_type ->> 'type') IS DISTINCT FROM 'in_process'
               OR coalesce(mv.handlers -> j.job_type ->> 'value', '') = ANY(%(inline)s))
        ORDER BY j.next_attempt_at
        LIMIT %(remote_limit)s
        FOR UPDATE OF j SKIP LOCKED
    ), due AS (
        SELECT job_id FROM local_due UNION ALL SELECT job_id FROM remote_due
    )
    UPDATE jobs AS j
    SET status = 'started', attempts = j.attempts + 1, started_at = now(), updated_at = now(),
        locked_by = %(me)s, lease_expires_at = now() + make_interval(secs => %(lease)s),
        timeout_seconds = CAST(mv.handlers -> j.job_type ->> 'timeout_seconds' AS double precision)
    FROM due, model_versions AS mv LEFT JOIN signing ON TRUE
    WHERE j.job_id = due.job_id AND mv.model_id = j.model_id AND mv.version = j.model_version
    RETURNING j.job_id, j.job_type, j.model_id, j.model_version, j.assignment_id, j.client_id,
              j.domain_id, j.service_id, j.input, j.features, j.domain_features, j.attempts,
              mv.handlers -> j.job_type AS handler,
              EXTRACT(EPOCH FROM now() - j.created_at) AS queued_seconds,
              pg_column_size(j.input) + coalesce(pg_column_size(j.features), 0)
                + coalesce(pg_column_size(j.domain_features), 0) AS payload_bytes,
              signing.kid AS signing_kid, signing.secret AS signing_secret
    """
# the :lookahead oldest due jobs (looked up by primary key: a bounded scan, whatever the backlog)
_WINDOW = """AND j.job_id = ANY(ARRAY(
                SELECT job_id FROM jobs WHERE status = 'pending' AND next_attempt_at <= now()
                ORDER BY next_attempt_at LIMIT %(lookahead)s))"""
# The usual claim looks for both kinds among the :lookahead oldest due jobs; the deep one (at
# most once per polling interval, when the window held too few jobs that need a worker) scans
# the whole queue for them, so none waits behind a long backlog of other kinds for long.
_CLAIM = _CLAIM_TEMPLATE.format(window=_WINDOW, local_window=_WINDOW, signing=callbacks.SIGNING_KEY_SQL)
_CLAIM_DEEP = _CLAIM_TEMPLATE.format(window=_WINDOW, local_window="", signing=callbacks.SIGNING_KEY_SQL)
# The claim and record connections plan their statements with index scans (a queue that was just
# bulk-loaded has no statistics yet, and a bitmap or sequential scan of the whole backlog per
# claim cost hundreds of milliseconds; their statements reach jobs by index) and without JIT
# (the cost of a scan that has no index, such as the few webhooks, then passes JIT's threshold,
# and compiling a millisecond statement took 400 ms).
_CONNECTION_SETUP = "SET enable_seqscan = off; SET enable_bitmapscan = off; SET jit = off"
# registration and heartbeat (re-registers a dispatcher whose row a peer removed as dead)
_HEARTBEAT = text(
    """
    INSERT INTO dispatchers (id, name, host, pid, workers) VALUES (:me, :name, :host, :pid, :workers)
    ON CONFLICT (id) DO UPDATE SET heartbeat_at = now()
    """
)
_UNREGISTER = text("DELETE FROM dispatchers WHERE id = :me")
# dispatchers that stopped heartbeating (judged only by a dispatcher that is itself healthy)
_SILENT = text(
    """
    SELECT id FROM dispatchers
    WHERE id <> :me AND heartbeat_at < now() - make_interval(secs => :dead_after)
    """
)
_SAME_HOST = text("SELECT id, pid FROM dispatchers WHERE host = :host AND id <> :me")
# leased (in-process, or claimed and not yet handed over) jobs of dead dispatchers
_ORPHANS = text(
    """
    SELECT job_id, attempts, locked_by FROM jobs
    WHERE status = 'started' AND lease_expires_at IS NOT NULL AND locked_by <> :me
      AND (locked_by = ANY(CAST(:dead AS text[]))
           OR (:judge AND NOT EXISTS (SELECT 1 FROM dispatchers AS d WHERE d.id = jobs.locked_by)))
    ORDER BY job_id LIMIT 1000
    FOR UPDATE SKIP LOCKED
    """
)
_REQUEUE_ORPHANS = text(
    """
    UPDATE jobs AS j SET status = 'pending', locked_by = NULL, lease_expires_at = NULL, started_at = NULL,
        -- its old due time: back at the head of the queue, not behind the backlog that grew since
        next_attempt_at = LEAST(j.next_attempt_at, now()), updated_at = now(),
        dispatch_error = jsonb_build_object('code', 'dispatcher_died', 'message',
            'the dispatcher running this job stopped heartbeating; the job was queued again',
            'previous_dispatcher', j.locked_by, 'attempts', j.attempts)
    WHERE j.job_id = ANY(CAST(:ids AS text[])) AND j.status = 'started'
    """
)
_FORGET = text(
    """
    DELETE FROM dispatchers WHERE id = ANY(CAST(:ids AS text[]))
      AND (id = ANY(CAST(:gone AS text[])) OR heartbeat_at < now() - make_interval(secs => :dead_after))
    """
)
_RELEASE = text(
    """
    UPDATE jobs SET status = 'pending', locked_by = NULL, lease_expires_at = NULL, started_at = NULL,
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
    UPDATE jobs AS j SET status = 'pending', locked_by = NULL, lease_expires_at = NULL, started_at = NULL,
        next_attempt_at = now(), updated_at = now(),
        dispatch_error = jsonb_build_object('code', 'lease_expired', 'message',
            'the dispatcher running this job stopped renewing its lease; the job was queued again',
            'previous_dispatcher', j.locked_by, 'attempts', j.attempts)
    FROM expired WHERE j.job_id = expired.job_id
    RETURNING j.job_id
    """
)
# A claim this dispatcher gave up on (its connection timed out: a frozen server) may still run
# and commit on the server once it answers again: its jobs are then `started` and leased to us,
# but we never heard of them (they would wait for the lease, PIE_IN_PROCESS_LEASE_SECONDS).
# Until the backend of every such claim is gone, the jobs leased to us that we do not hold go
# back to the queue, not counting as an attempt.
_CLAIM_BACKENDS_ALIVE = text("SELECT pid FROM pg_stat_activity WHERE pid = ANY(CAST(:pids AS integer[]))")
_RELEASE_UNKNOWN_CLAIMS = text(
    """
    UPDATE jobs SET status = 'pending', locked_by = NULL, lease_expires_at = NULL,
        attempts = GREATEST(attempts - 1, 0), next_attempt_at = LEAST(next_attempt_at, now()), updated_at = now()
    WHERE status = 'started' AND locked_by = :me AND lease_expires_at IS NOT NULL
      AND NOT (job_id = ANY(CAST(:held AS text[])))
    RETURNING job_id
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


def _encoded_output(output: Any) -> str:
    """The handler's output as the JSON text to store: it must be JSON that PostgreSQL can store
    (no NaN/Infinity, no NUL characters or unpaired surrogates). Encoded once; only a text that
    may hold a NUL or a surrogate (its ASCII escapes) is looked at closer."""
    try:
        encoded = json.dumps(output, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError) as exc:
        raise HandlerFailure("invalid_output", f"the handler returned output that is not JSON: {exc}") from exc
    if "\\u0000" in encoded or "\\ud" in encoded:
        problem = unstorable_json(json.loads(encoded))
        if problem is not None:
            raise HandlerFailure("invalid_output", f"the handler returned output that cannot be stored: {problem}")
    return encoded


def _failure(job_id: str, exc: BaseException) -> Completion:
    if isinstance(exc, HandlerFailure):
        return Completion(job_id, "failure", error=storable_error(exc.error))
    return Completion(
        job_id,
        "failure",
        error=storable_error(
            {
                "code": "handler_exception",
                "message": str(exc) or exc.__class__.__name__,
                "exception": exc.__class__.__name__,
            }
        ),
    )


def _run_job(job_id: str, implementation: Any, payload: dict[str, Any], context: JobContext) -> Completion:
    """Run a synchronous implementation (on the loop for inline ones, else in a pool thread):
    its result as a Completion; never raises. The handler's log lines carry the job id, and
    ``inprocess.current_job()`` is its context (with the cancel flag, spec 15.4)."""
    token = job_id_var.set(job_id)
    try:
        if context.cancelled():  # cancelled between the claim and now: not run at all
            raise HandlerFailure("cancelled", "the job was cancelled before its handler ran")
        output = run_in_context(context, implementation, payload)
        return Completion(job_id, "success", output=output, output_json=_encoded_output(output))
    except Exception as exc:
        return _failure(job_id, exc)
    finally:
        job_id_var.reset(token)


def _hand_to_aws(method: Callable[..., dict[str, Any]], handler: dict[str, Any], payload: dict[str, Any]) -> Any:
    """In an AWS pool thread: ``Invoke``/``RunTask``; what AWS accepted, or the DispatchError."""
    try:
        return method(handler, payload)
    except DispatchError as exc:
        return exc
    except Exception as exc:  # never lose a job to an unexpected error
        log.exception("handing over job %s failed", payload.get("job_id"))
        return DispatchError("dispatch_exception", str(exc), details={"exception": exc.__class__.__name__})


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


# SQLSTATE classes/codes worth retrying: connection failures (08), shutdown/crash (57P),
# resources (53), query_canceled (57014: statement timeout), serialization, deadlock, lock timeout
_TRANSIENT_SQLSTATES = {"57014", "40001", "40P01", "55P03"}
_TRANSIENT_SQLSTATE_CLASSES = ("08", "57P", "53")


def is_transient_db_error(exc: BaseException) -> bool:
    """True for database errors that go away by themselves: the server is down or restarting,
    the connection broke, a timeout or a transaction conflict."""
    from sqlalchemy import exc as sa_exc

    if isinstance(
        exc, (sa_exc.TimeoutError, sa_exc.InterfaceError, psycopg.OperationalError, psycopg.InterfaceError, OSError)
    ):
        return True
    if isinstance(exc, sa_exc.DBAPIError):
        if exc.connection_invalidated:
            return True
        orig = exc.orig
        state = getattr(orig, "sqlstate", None)
        if state is None:
            return isinstance(exc, sa_exc.OperationalError) or isinstance(
                orig, (psycopg.OperationalError, psycopg.InterfaceError)
            )
        return state in _TRANSIENT_SQLSTATES or state.startswith(_TRANSIENT_SQLSTATE_CLASSES)
    return False


def _process_gone(pid: int) -> bool:
    """True if no process ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OSError):
        return False
    return False


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
        self.aws_concurrency = max(settings.dispatch_aws_concurrency, 1)
        # Lambda/ECS hand-offs in flight (calling AWS or waiting for their turn); in-process jobs
        # are limited by the worker threads
        self.capacity = max(settings.dispatch_batch_size * 2, self.aws_concurrency * 2, 1)
        self._remote_chunk = max(min(settings.dispatch_batch_size, self.capacity) // 4, 1)
        self.workers = max(settings.in_process_workers, 1)
        # in-process results waiting to be recorded hold no worker, but at most this many
        self._unrecorded_cap = self.workers + 2 * max(settings.dispatch_batch_size, 1)
        # while jobs run, the recorder waits for this many results (or RECORD_LINGER_MAX)
        self._record_min = max(settings.dispatch_batch_size, 1)
        self.host = socket.gethostname()[:255]
        self.dispatched = 0
        self._aws = AwsBackends(settings, max_connections=self.aws_concurrency)
        self._aws_slots = asyncio.Semaphore(self.aws_concurrency)  # StopTask calls (cancellation)
        self._signer: callbacks.Signer | None = None
        self._pool: DaemonThreadPool | None = None
        self._aws_pool: DaemonThreadPool | None = None
        self._results: list[Completion] = []  # in-process results waiting to be recorded
        self._handed: list[tuple[Any, str | None, dict[str, Any]]] = []  # accepted AWS hand-offs to mark
        self._record_wake = asyncio.Event()
        self._record_conn: psycopg.AsyncConnection[Any] | None = None
        self._inflight: set[str] = set()  # claimed by us and not yet handed over / ended
        self._leased: set[str] = set()  # the subset whose lease we renew
        self._local: set[str] = set()  # the in-process subset, until their result is recorded
        self._busy: set[str] = set()  # in-process jobs whose handler has not returned (a worker each)
        self._lease_until: dict[str, float] = {}  # job id -> monotonic end of its lease as we know it
        self._contexts: dict[str, JobContext] = {}  # in-process jobs claimed: their cancel flags
        self._stops_due = True  # ECS tasks may wait to be stopped (a cancel, a retry timer, the start)
        self._stopper: asyncio.Task[Any] | None = None  # the loop's stop_tasks() in the background
        self._recording: list[Completion] = []  # the batch the recorder is recording right now
        self._marking: list[tuple[Any, str | None, dict[str, Any]]] = []  # the hand-offs it is marking
        self._registered = False
        self._more_due = False
        # look for Lambda/ECS jobs on the next claim? Only when something may have made one due
        # (a NOTIFY, the polling fallback, a retry timer, a finished hand-off): a worker that
        # became free needs only the in-process scan
        self._check_remote = True
        # look for jobs that need a worker? Not after a scan came up short, until something may
        # have made one due (so a backlog of other jobs is not scanned for them on every claim)
        self._check_local = True
        self._window_short = True
        self._last_deep = 0.0
        self._checked_remote = True
        self._healthy_since: float | None = None  # monotonic start of our unbroken heartbeats
        self._tasks: set[asyncio.Task[Any]] = set()
        self._background: list[asyncio.Task[Any]] = []
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopping = False
        self._running = False
        self._last_sweep = 0.0
        self._backlog = False
        self._claim_conn: psycopg.AsyncConnection[Any] | None = None
        self._schema_logged_at: float | None = None  # the last "schema not migrated" line
        # backend pid -> monotonic time: claims whose answer we gave up on (they may commit later)
        self._doubtful_claims: dict[int, float] = {}

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
    # liveness

    async def register(self) -> None:
        """Register (or heartbeat) in the ``dispatchers`` table."""
        started = time.monotonic()
        async with db.get_engine().begin() as conn:
            await conn.execute(
                _HEARTBEAT,
                {
                    "me": self.worker_id,
                    "name": self.name[:64],
                    "host": self.host,
                    "pid": os.getpid(),
                    "workers": self.workers,
                },
            )
        self._registered = True
        if self._healthy_since is None:
            self._healthy_since = started

    def _judges_peers(self) -> bool:
        """Only a dispatcher whose own heartbeats succeeded for ``dispatch_dead_after`` seconds
        in a row may call a silent peer dead (after an outage everyone's heartbeat is stale)."""
        return (
            self._healthy_since is not None
            and time.monotonic() - self._healthy_since >= self.settings.dispatch_dead_after
        )

    async def _heartbeater(self) -> None:
        while True:
            try:
                await self.register()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._healthy_since is not None:
                    log.warning("dispatcher %s: heartbeat failed: %s", self.worker_id, exc)
                self._healthy_since = None
            await asyncio.sleep(self.settings.dispatch_heartbeat_interval)

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
    # claiming and handing over

    async def claim_and_dispatch(self, *, eager: bool = True) -> int:
        """Claim up to the free capacity of due jobs and hand them over (in-process jobs start
        at once; their results are recorded later by the recorder). ``eager=False`` (the loop):
        jobs that need a worker are not looked for again after a look came up short, until a
        NOTIFY, a timer or the polling fallback says one may be due."""
        if eager:
            self._check_local = True
        if self._doubtful_claims:
            await self.settle_doubtful_claims()
        remote = len(self._inflight) - len(self._local)
        # jobs that need no worker: hand-offs, within the capacity for them, and inline in-process
        # jobs, within the results that may wait to be recorded
        remote_limit = (
            max(
                min(
                    self.settings.dispatch_batch_size,
                    self.capacity - remote,
                    self._unrecorded_cap - len(self._local),
                ),
                0,
            )
            if self._check_remote
            else 0
        )
        if 0 < remote_limit < self._remote_chunk and remote >= self.aws_concurrency:
            # every AWS thread is busy and more hand-offs wait for one: claim again when a
            # chunk is free, not once per finished hand-off
            remote_limit = 0
        self._checked_remote = self._check_remote and self._check_local  # every kind looked for
        local_limit = max(
            min(
                self.settings.dispatch_batch_size,
                self.workers - len(self._busy),
                self._unrecorded_cap - len(self._local),
            ),
            0,
        )
        if not self._check_local:
            local_limit = 0
        if (remote_limit <= 0 and local_limit <= 0) or self._stopping:
            return 0
        if not self._registered:
            await self.register()  # peers must see us alive before we hold any job
        lease = self.settings.in_process_lease_seconds
        claimed_at = time.monotonic()
        deep = False
        if local_limit > 0 and self._window_short:
            now = time.monotonic()
            if now - self._last_deep >= self.settings.dispatch_poll_interval:
                deep, self._last_deep = True, now
        rows, tokens = await self._claim(
            _CLAIM_DEEP if deep else _CLAIM,
            {
                "local_limit": local_limit,
                "remote_limit": remote_limit,
                "lookahead": max(self.settings.dispatch_batch_size * 10, 500),
                "inline": inline_names(),
                "me": self.worker_id,
                "lease": lease,
            },
        )
        inline = set(inline_names())
        n_local = sum(
            1
            for r in rows
            if isinstance(r.handler, dict)
            and r.handler.get("type") == "in_process"
            and r.handler.get("value") not in inline
        )
        self._check_remote = remote_limit > 0 and len(rows) - n_local == remote_limit
        if local_limit > 0:
            self._check_local = n_local == local_limit
            # the window held too few: the next claims look deeper (at most once per interval)
            self._window_short = not deep and n_local < local_limit
        # every free worker (or the whole batch) got a job: probably more are due (the recorder
        # lingers for their results)
        self._backlog = (local_limit > 0 and n_local == local_limit) or self._check_remote
        if not rows:
            self._more_due = False
            return 0
        self._idle.clear()
        rows.sort(key=lambda r: r.job_id)
        for row in rows:
            self._inflight.add(row.job_id)
            self._leased.add(row.job_id)
            self._lease_until[row.job_id] = claimed_at + lease
            if isinstance(row.handler, dict) and row.handler.get("type") == "in_process":
                self._contexts[row.job_id] = JobContext(row.job_id)
        self.dispatched += len(rows)
        self._hand_over(rows, tokens)
        # claim again at once only if a kind filled its limit and this dispatcher has room for more of it
        self._more_due = (
            local_limit > 0
            and n_local == local_limit
            and len(self._busy) < self.workers
            and len(self._local) < self._unrecorded_cap
        ) or (remote_limit > 0 and len(rows) - n_local == remote_limit)
        return len(rows)

    async def _claim(self, statement: str, params: dict[str, Any]) -> tuple[list[Any], dict[str, str]]:
        """Claim due jobs and sign their callback tokens, in one transaction on this
        dispatcher's own connection (no pool checkout or ping): BEGIN, the claim statement
        (which also reads and share-locks the signing key), the tokens (the batch signer), COMMIT.
        A retired key therefore signs nothing once its retirement has committed
        (``pie.callbacks``), and a claim that fails leaves its jobs pending. A connection that
        failed or was interrupted is closed and replaced; when a connection that sat idle turns
        out broken (the server restarted, a proxy or firewall closed it), the claim is tried once
        more at once on a new one instead of waiting for the next cycle."""
        for retry in (False, True):
            conn = self._claim_conn
            fresh = conn is None or conn.closed
            if fresh:
                conn = self._claim_conn = await db.connect(self.settings, autocommit=True, row_factory=namedtuple_row)
                await conn.execute(_CONNECTION_SETUP)
            assert conn is not None
            backend = conn.info.backend_pid
            try:
                # BEGIN and COMMIT cost two round trips more than an autocommit claim (the key
                # must stay share-locked until the claim commits: pie.callbacks)
                async with conn.transaction():
                    rows = await (await conn.execute(statement, params)).fetchall()
                    return rows, await self._sign(conn, rows)
            except BaseException as exc:
                # the statement may have reached the server and commit there after all
                self._doubtful_claims.setdefault(backend, time.monotonic())
                self._claim_conn = None
                broken = conn.broken
                with contextlib.suppress(Exception):
                    await conn.close()
                if fresh or retry or not broken or not isinstance(exc, psycopg.OperationalError):
                    raise
        raise AssertionError("unreachable")

    async def _sign(self, conn: psycopg.AsyncConnection[Any], rows: list[Any]) -> dict[str, str]:
        """Each claimed job's callback token (job id -> token), signed with the key the claim
        read (or, when there is no active key yet, one created in this transaction)."""
        if not rows:
            return {}
        first = rows[0]
        if first.signing_kid is not None:
            key = callbacks.Key(first.signing_kid, first.signing_secret)
        else:
            key = await callbacks.signing_key(conn)
        if self._signer is None or self._signer.key != key:
            self._signer = callbacks.Signer(key)
        settings, sign, now = self.settings, self._signer.sign, time.time()
        return {
            row.job_id: sign(
                row, callback_token_ttl(settings, row.handler if isinstance(row.handler, dict) else None), now=now
            )
            for row in rows
        }

    async def settle_doubtful_claims(self) -> list[str]:
        """Put back in the queue the jobs that claims we gave up on committed after all (see
        ``_RELEASE_UNKNOWN_CLAIMS``); stop doubting a claim once its backend has ended (its
        commit, if any, is then visible) or after a lease. Returns the released job ids."""
        now = time.monotonic()
        lease = self.settings.in_process_lease_seconds
        for pid, since in list(self._doubtful_claims.items()):
            if now - since > lease:  # the lease expiry recovers whatever it claimed
                del self._doubtful_claims[pid]
        pids = sorted(self._doubtful_claims)
        if not pids:
            return []
        async with db.get_engine().begin() as conn:
            # first which backends still run: a claim whose backend is gone has committed or
            # rolled back, and the UPDATE after this (a new snapshot) sees its jobs
            alive = set((await conn.execute(_CLAIM_BACKENDS_ALIVE, {"pids": pids})).scalars())
            held = sorted(self._inflight)
            released = list(
                (await conn.execute(_RELEASE_UNKNOWN_CLAIMS, {"me": self.worker_id, "held": held})).scalars()
            )
            if released:
                await conn.execute(text("SELECT pg_notify(:c, '')"), {"c": NOTIFY_CHANNEL})
        for pid in pids:
            if pid not in alive:
                self._doubtful_claims.pop(pid, None)
        if released:
            log.warning(
                "dispatcher %s: %d job(s) claimed by a statement it had given up on (the database answered "
                "late) are back in the queue: %s",
                self.worker_id,
                len(released),
                ", ".join(sorted(released)[:10]),
            )
        return released

    async def _close_claim_connection(self) -> None:
        conn, self._claim_conn = self._claim_conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _hand_over(self, rows: list[Any], tokens: dict[str, str]) -> None:
        """Give each claimed job to its backend, without waiting: inline implementations run
        right here, ``async def`` ones become tasks, plain ones go to the worker pool, Lambda and
        ECS calls to the AWS pool. Results come back through ``_on_results``/``_on_handed``."""
        s = self.settings
        attempts: dict[Any, int] = {}
        for row in rows:
            handler: dict[str, Any] = row.handler if isinstance(row.handler, dict) else {}
            kind = handler.get("type") if handler else None
            attempts[kind] = attempts.get(kind, 0) + 1
            metrics.job_started(row.job_type, row.queued_seconds)
            payload = build_payload(s, row, tokens[row.job_id])
            if kind == "in_process":
                self._local.add(row.job_id)
                self._busy.add(row.job_id)
                registered = get_registered(str(handler.get("value")))
                if registered is None:
                    error = DispatchError(
                        "unknown_in_process_handler",
                        f"no in-process implementation named {handler.get('value')!r} is registered in this process",
                        retryable=False,
                    )
                    self._busy.discard(row.job_id)
                    self._spawn(self._dispatch_failed(row, error, kind))
                    continue
                mode = registered.mode
                if mode == "inline" and (row.payload_bytes or 0) > INLINE_MAX_PAYLOAD_BYTES:
                    mode = "thread"
                context = self._contexts.get(row.job_id) or JobContext(row.job_id)
                if mode == "inline":
                    self._busy.discard(row.job_id)
                    self._results.append(_run_job(row.job_id, registered.implementation, payload, context))
                elif mode == "async":
                    self._spawn(self._run_async(row.job_id, registered.implementation, payload, context))
                else:
                    assert self._pool is not None
                    self._pool.run_soon(_run_job, row.job_id, registered.implementation, payload, context)
            elif kind in ("lambda", "ecs_task"):
                method = self._aws.invoke_lambda if kind == "lambda" else self._aws.run_ecs_task
                assert self._aws_pool is not None
                self._aws_pool.run_soon(self._aws_call, row, kind, method, handler, payload)
            else:
                error = DispatchError(
                    "invalid_handler",
                    f"model version has no usable {row.job_type} handler (type {kind!r})",
                    retryable=False,
                )
                self._spawn(self._dispatch_failed(row, error, kind))
        for kind, n in attempts.items():
            metrics.dispatch_attempt(kind, n)
        if self._results:
            self._record_wake.set()
            self._wake.set()  # inline jobs freed their workers already

    @staticmethod
    def _aws_call(row: Any, kind: str, method: Callable[..., Any], handler: dict[str, Any], payload: dict[str, Any]):
        return row, kind, _hand_to_aws(method, handler, payload)

    async def _run_async(self, job_id: str, implementation: Any, payload: dict[str, Any], context: JobContext) -> None:
        """An ``async def`` implementation, as a task on the loop (its log lines carry the job
        id; ``inprocess.current_job()`` is its context, with the cancel flag)."""
        job_id_var.set(job_id)
        try:
            if context.cancelled():  # cancelled between the claim and now: not run at all
                raise HandlerFailure("cancelled", "the job was cancelled before its handler ran")
            output = await await_in_context(context, implementation, payload)
            completion = Completion(job_id, "success", output=output, output_json=_encoded_output(output))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            completion = _failure(job_id, exc)
        self._on_results([completion])

    def _on_results(self, completions: list[Completion]) -> None:
        """In-process handlers returned (a batch of them): their workers are free; the results
        wait for the recorder."""
        for completion in completions:
            self._busy.discard(completion.job_id)
        self._results.extend(completions)
        self._record_wake.set()
        self._wake.set()  # capacity is free again

    def _on_handed(self, items: list[tuple[Any, str, Any]]) -> None:
        """AWS calls returned (a batch of them): accepted hand-offs wait for the recorder to
        clear their lease; failures are retried or given up."""
        for row, kind, info in items:
            if isinstance(info, DispatchError):
                self._spawn(self._dispatch_failed(row, info, kind))
                continue
            self._leased.discard(row.job_id)
            self._handed.append((row, public_url_warning(self.settings, kind), info))
        if self._handed:
            self._record_wake.set()

    async def _dispatch_failed(self, row: Any, exc: DispatchError, kind: str | None) -> None:
        job_id_var.set(row.job_id)
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
                asyncio.get_running_loop().call_later(delay, self._wake_all)
                log.warning(
                    "job %s: dispatch attempt %d failed (%s); retrying in %.2fs",
                    row.job_id,
                    row.attempts,
                    exc.message,
                    delay,
                )
            else:
                if exc.retryable:
                    error["message"] = f"gave up after {row.attempts} attempts: {exc.message}"
                await self._finish([Completion(row.job_id, "failure", error=error)])
                log.warning("job %s failed: %s", row.job_id, error["message"])
        finally:
            self._done(row.job_id)

    def _wake_all(self) -> None:
        """Wake the loop to look for due jobs of every kind (a NOTIFY, a retry coming due)."""
        self._check_remote = True
        self._check_local = True
        self._wake.set()

    def _done(self, job_id: str) -> None:
        if job_id not in self._local:
            self._check_remote = True  # room for another hand-off
        self._inflight.discard(job_id)
        self._leased.discard(job_id)
        self._local.discard(job_id)
        self._busy.discard(job_id)
        self._lease_until.pop(job_id, None)
        self._contexts.pop(job_id, None)
        if not self._inflight:
            self._idle.set()
        self._wake.set()  # capacity is free again

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
