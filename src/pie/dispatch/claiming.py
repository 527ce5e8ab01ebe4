"""Claiming due jobs (``FOR UPDATE SKIP LOCKED``, one autocommit statement on the claim
connection), signing their callback tokens and handing them over: inline, async, the worker pool,
Lambda/ECS through the AWS pool; a failed hand-over retries with backoff or ends the job."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg.rows import namedtuple_row
from sqlalchemy import text

from pie import callbacks, db, metrics
from pie.auth import signing_keys
from pie.dispatch.backends import DispatchError, public_url_warning
from pie.dispatch.inprocess import (
    HandlerFailure,
    JobContext,
    await_in_context,
    get_registered,
    inline_names,
    run_in_context,
)
from pie.dispatch.outcomes import _encoded_output, _failure, backoff_delay
from pie.dispatch.recording import Recording
from pie.dispatch.statements import (
    _CLAIM,
    _CLAIM_BACKENDS_ALIVE,
    _CLAIM_DEEP,
    _CONNECTION_SETUP,
    _RELEASE_UNKNOWN_CLAIMS,
    _RETRY,
)
from pie.jobs.channels import NOTIFY_CHANNEL
from pie.jobs.logic import Completion
from pie.jobs.payload import build_payload, callback_token_ttl
from pie.logconfig import job_id_var

log = logging.getLogger("pie.dispatch")

# A worker frees while others still run the jobs of the same claim (instant handlers end within
# microseconds of each other): the claim waits this long for them, so one claim transaction
# serves every free worker instead of one claim for the first and another for the rest.
CLAIM_COALESCE = 0.001


# An inline (built-in) handler whose job carries more than this many stored bytes of input and
# features runs in the worker pool instead, so a large payload never holds up the event loop.
INLINE_MAX_PAYLOAD_BYTES = 16 * 1024


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


class Claiming(Recording):
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
            key = signing_keys.Key(first.signing_kid, first.signing_secret)
        else:
            key = await signing_keys.signing_key(conn)
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
