"""The delivery loop: runs beside every dispatcher (``pie serve``'s and ``pie worker``'s) as its
own asyncio task, and POSTs queued events to their webhooks.

One cycle claims due deliveries with ``FOR UPDATE SKIP LOCKED`` in one statement (any number of
processes share the queue; each delivery goes to one of them at a time), at most
``PIE_WEBHOOKS_ENDPOINT_CONCURRENCY`` in flight per webhook per process and
``PIE_WEBHOOKS_CONCURRENCY`` in all, webhooks taken in random order, so one slow or dead receiver
never takes every slot. A claim moves the delivery's ``next_attempt_at`` past a lease
(``lease_seconds``, longer than any attempt can take): if the process dies mid-delivery, the
delivery is due again when the lease ends and is sent again with the same ``webhook-id``
(at-least-once).

Each attempt: one POST of ``{type, timestamp, data}`` over the process's shared ``httpx`` client
(connect timeout ``PIE_WEBHOOKS_CONNECT_TIMEOUT``, the whole attempt bounded by
``PIE_WEBHOOKS_TIMEOUT``), the Standard Webhooks headers signed by the ``standardwebhooks``
package (both secrets during a rotation's overlap), redirects not followed, at most 1 KiB of the
answer read. Connections go through :class:`pie.webhooks.safety.GuardedNetworkBackend` (the
address check at every connection). Any 2xx delivers; 410 fails the delivery and disables the
webhook; anything else is retried with exponential backoff and jitter (the first retry within
``PIE_WEBHOOKS_BACKOFF_BASE`` <= 10 s, then doubling up to ``PIE_WEBHOOKS_BACKOFF_MAX``) until the
delivery is ``PIE_WEBHOOKS_RETRY_HOURS`` old. Results are recorded in batches (one statement per
batch); a database outage is waited out (a result that cannot be recorded before its lease ends
is sent again later: same id).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import httpcore
import httpx
import psycopg
from psycopg.rows import namedtuple_row
from sqlalchemy import text
from standardwebhooks import Webhook as StandardWebhook

from pie import db, metrics
from pie.config import Settings
from pie.schemagate import SCHEMA_LOG_SECONDS, SCHEMA_WAIT_SECONDS, is_schema_error
from pie.schemas import iso_z
from pie.webhooks.events import MAX_RESPONSE_BYTES
from pie.webhooks.outbox import NOTIFY_CHANNEL
from pie.webhooks.safety import GuardedNetworkBackend, UnsafeTarget

log = logging.getLogger("pie.webhooks")


# a claimed delivery is not claimed again for this long after the claim: twice the longest an
# attempt may take, plus a margin (a process killed mid-delivery delays it by at most this)
def lease_seconds(settings: Settings) -> float:
    return 2 * settings.webhooks_timeout + 15.0


RESULT_BATCH = 500
RESULT_LINGER = 0.01  # seconds the recorder waits for more results of a burst
CLAIM_COALESCE = 0.01  # seconds the loop waits after a slot frees for more to free
# a process claims up to this many times its attempt slots (per webhook and in all), so the next
# deliveries are at hand when a slot frees (a claim's round trip is not in every attempt's path)
PREFETCH = 2
SWEEP_INTERVAL = 600.0  # seconds between retention sweeps
USER_AGENT = "PIE-Webhooks/2.0"

_CLAIM = """
    WITH hooks AS MATERIALIZED (
        SELECT w.id, GREATEST(CAST(%(per_webhook)s AS int) - coalesce(b.n, 0), 0) AS room
        FROM webhooks AS w
        LEFT JOIN unnest(CAST(%(busy_ids)s AS uuid[]), CAST(%(busy_counts)s AS int[])) AS b(id, n) ON b.id = w.id
        WHERE w.status = 'active'
        ORDER BY random()
    ), picked AS (
        SELECT due.id FROM hooks
        CROSS JOIN LATERAL (
            SELECT d.id FROM webhook_deliveries AS d
            WHERE d.webhook_id = hooks.id AND d.status = 'pending' AND d.next_attempt_at <= now()
            ORDER BY d.next_attempt_at
            LIMIT hooks.room
            FOR UPDATE SKIP LOCKED
        ) AS due
        LIMIT %(limit)s
    )
    UPDATE webhook_deliveries AS d
    SET attempts = d.attempts + 1, last_attempt_at = now(),
        next_attempt_at = now() + make_interval(secs => %(lease)s)
    FROM picked, webhook_events AS e, webhooks AS w
    WHERE d.id = picked.id AND e.id = d.event_id AND w.id = d.webhook_id
    RETURNING d.id, d.event_id, d.webhook_id, d.attempts, e.type, e.data, e.created_at AS event_at,
        w.url, w.secret,
        CASE WHEN w.previous_secret_expires_at > now() THEN w.previous_secret END AS previous_secret,
        EXTRACT(EPOCH FROM now() - e.created_at) AS age_seconds
    """
# one statement per batch of results; the retry window and the clock are the database's
_RECORD = """
    UPDATE webhook_deliveries AS d SET
        status = CASE WHEN r.outcome = 'delivered' THEN 'delivered'
                      WHEN r.outcome = 'gone' THEN 'failed'
                      WHEN d.created_at + make_interval(secs => %(window)s) <= now() THEN 'failed'
                      ELSE 'pending' END,
        delivered_at = CASE WHEN r.outcome = 'delivered' THEN now() END,
        next_attempt_at = CASE WHEN r.outcome IN ('delivered', 'gone') THEN now()
                               ELSE now() + make_interval(secs => r.delay) END,
        last_status_code = r.code, last_error = r.error, last_response = r.response
    FROM unnest(CAST(%(ids)s AS bigint[]), CAST(%(outcomes)s AS text[]), CAST(%(codes)s AS int[]),
                CAST(%(errors)s AS text[]), CAST(%(responses)s AS text[]), CAST(%(delays)s AS double precision[]))
         AS r(id, outcome, code, error, response, delay)
    WHERE d.id = r.id AND d.status = 'pending'
    RETURNING d.status
    """
# ... and, for a batch with 410s, the webhooks disabled in the same statement
_RECORD_AND_DISABLE = f"""
    WITH recorded AS ({_RECORD}), disabled AS (
        UPDATE webhooks SET status = 'disabled', updated_at = now(),
            disabled_reason = 'the receiver answered 410 Gone at '
                || to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')
        WHERE id = ANY(CAST(%(gone)s AS uuid[])) AND status = 'active'
    )
    SELECT status FROM recorded
    """
# deliveries this process claimed and did not attempt (stopping): due again at once
_RELEASE = "UPDATE webhook_deliveries SET next_attempt_at = now() WHERE id = ANY(CAST(%(ids)s AS bigint[])) AND status = 'pending'"
# retention: events older than the retention with nothing left to deliver (their log goes with
# them), in bounded batches
_SWEEP = text(
    """
    WITH old AS (
        SELECT e.id FROM webhook_events AS e
        WHERE e.created_at < now() - make_interval(secs => :seconds)
          AND NOT EXISTS (
              SELECT 1 FROM webhook_deliveries AS d JOIN webhooks AS w ON w.id = d.webhook_id
              WHERE d.event_id = e.id AND d.status = 'pending')
        ORDER BY e.created_at LIMIT 5000
    )
    DELETE FROM webhook_events AS e USING old WHERE e.id = old.id
    """
)


@functools.lru_cache(maxsize=4096)
def _signer(secret: str) -> StandardWebhook:
    return StandardWebhook(secret)


def sign(secrets: list[str], msg_id: str, when: datetime, body: str) -> str:
    """The ``webhook-signature`` header: one ``v1,<base64>`` per secret, space-separated
    (computed by the ``standardwebhooks`` package)."""
    return " ".join(_signer(secret).sign(msg_id, when, body) for secret in secrets)


def backoff_delay(settings: Settings, attempts: int) -> float:
    """Seconds until the next attempt after ``attempts`` failed ones: exponential with (equal)
    jitter; the first retry comes within ``webhooks_backoff_base``."""
    ceiling = min(settings.webhooks_backoff_max, settings.webhooks_backoff_base * 2 ** max(attempts - 1, 0))
    return ceiling / 2 + random.uniform(0, ceiling / 2)


class GuardedTransport(httpx.AsyncHTTPTransport):
    """httpx's transport over :class:`GuardedNetworkBackend` (httpx takes no network backend,
    so its connection pool is rebuilt with one; httpx is pinned)."""

    def __init__(self, settings: Settings):
        super().__init__(trust_env=False, retries=0)
        limits = settings.webhooks_concurrency
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=True),
            max_connections=limits,
            max_keepalive_connections=limits,
            keepalive_expiry=30.0,
            network_backend=GuardedNetworkBackend(allow_private=settings.webhooks_allow_private),
        )


def make_client(settings: Settings) -> httpx.AsyncClient:
    """The process's shared client: no proxies from the environment, no redirects followed."""
    return httpx.AsyncClient(
        transport=GuardedTransport(settings),
        timeout=httpx.Timeout(settings.webhooks_timeout, connect=settings.webhooks_connect_timeout),
        follow_redirects=False,
        trust_env=False,
        headers={"user-agent": USER_AGENT},
    )


@dataclass
class Result:
    delivery_id: int
    webhook_id: uuid.UUID
    outcome: str  # delivered | gone | http_error | network_error | refused
    status_code: int | None
    error: str | None
    response: str | None
    delay: float  # seconds until the next attempt, when it is retried


async def attempt(client: httpx.AsyncClient, settings: Settings, row: Any) -> Result:
    """One delivery attempt of a claimed row (never raises for the receiver's faults)."""
    body = json.dumps(
        {"type": row.type, "timestamp": iso_z(row.event_at), "data": row.data},
        ensure_ascii=False,
        separators=(",", ":"),
    )
    msg_id = str(row.event_id)
    now = datetime.now(timezone.utc)
    secrets = [row.secret] + ([row.previous_secret] if row.previous_secret else [])
    headers = {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(math.floor(now.timestamp())),
        "webhook-signature": sign(secrets, msg_id, now, body),
    }
    started = time.perf_counter()
    code: int | None = None
    response_text: str | None = None
    error: str | None = None
    try:
        async with asyncio.timeout(settings.webhooks_timeout):
            async with client.stream("POST", row.url, content=body.encode("utf-8"), headers=headers) as response:
                code = response.status_code
                kept = bytearray()
                async for chunk in response.aiter_bytes():
                    kept += chunk
                    if len(kept) >= MAX_RESPONSE_BYTES:
                        break
        response_text = bytes(kept[:MAX_RESPONSE_BYTES]).decode("utf-8", "replace").replace("\x00", "\ufffd")
        if 200 <= code < 300:
            outcome = "delivered"
        elif code == 410:
            outcome = "gone"
            error = "the receiver answered 410 Gone: the webhook was disabled"
        else:
            outcome = "http_error"
            error = f"the receiver answered {code}"
    except UnsafeTarget as exc:
        outcome, error = "refused", f"not sent: {exc}"
    except (TimeoutError, httpx.TimeoutException):
        outcome, error = "network_error", f"no answer within {settings.webhooks_timeout:g} seconds"
    except (httpx.HTTPError, OSError) as exc:
        outcome, error = "network_error", f"{exc.__class__.__name__}: {exc}"[:500]
    except Exception as exc:  # never lose a delivery to an unexpected error: it is retried
        log.warning("webhook delivery %s: unexpected error %s", row.id, exc.__class__.__name__, exc_info=True)
        outcome, error = "network_error", f"{exc.__class__.__name__}: {exc}"[:500]
    seconds = time.perf_counter() - started
    lag = float(row.age_seconds) + seconds if outcome == "delivered" and row.age_seconds is not None else None
    metrics.webhook_attempt(outcome, seconds, lag)
    return Result(row.id, row.webhook_id, outcome, code, error, response_text, backoff_delay(settings, row.attempts))


class Deliverer:
    """The delivery loop of one process (start it beside the dispatcher, stop it with it)."""

    def __init__(self, settings: Settings, name: str = "webhooks"):
        self.settings = settings
        self.name = name
        self.delivered = 0
        self._client: httpx.AsyncClient | None = None
        self._inflight: dict[int, uuid.UUID] = {}  # delivery id -> webhook id (claimed, attempt not over)
        self._claimed: set[int] = set()  # claimed by this process, result not recorded yet
        self._recording: list[Result] = []  # the batch the recorder holds (stop() records it)
        self._busy: Counter[uuid.UUID] = Counter()  # per webhook: claimed, attempt not over
        # attempts under way: per webhook, and in this process
        self._endpoint_slots: dict[uuid.UUID, asyncio.Semaphore] = {}
        self._process_slots = asyncio.Semaphore(settings.webhooks_concurrency)
        self._results: asyncio.Queue[Result] = asyncio.Queue()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._background: list[asyncio.Task[Any]] = []
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopping = False
        self._schema_logged_at: float | None = None  # the last "schema not migrated" line
        self._last_sweep = 0.0
        # the claims' and the results' own autocommit connections: one round trip per statement
        self._conns: dict[str, psycopg.AsyncConnection[Any]] = {}

    async def start(self) -> None:
        self._client = make_client(self.settings)
        self._background = [
            asyncio.create_task(self._listen(), name=f"{self.name}-webhooks-listener"),
            asyncio.create_task(self._loop(), name=f"{self.name}-webhooks-loop"),
            asyncio.create_task(self._recorder(), name=f"{self.name}-webhooks-recorder"),
        ]
        log.info("webhook delivery %s started", self.name)

    async def stop(self, grace: float = 10.0) -> None:
        """Stop claiming; let attempts under way end for up to ``grace`` seconds; record their
        results; give the rest back to the queue (due at once)."""
        if self._stopping:
            return
        self._stopping = True
        for task in self._background[:2]:
            task.cancel()
        if self._inflight:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout=grace)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # the recorder stops; the results it held and those still queued are recorded here
        self._background[2].cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        pending: list[Result] = list(self._recording)
        while not self._results.empty():
            pending.append(self._results.get_nowait())
        if pending:
            with contextlib.suppress(Exception):
                await self._record(pending, retry_for=min(grace, 5.0))
        leftover = sorted(self._claimed)
        if leftover:
            with contextlib.suppress(Exception):
                await self._execute("results", _RELEASE, {"ids": leftover})
        for conn in self._conns.values():
            with contextlib.suppress(Exception):
                await conn.close()
        self._conns.clear()
        if self._client is not None:
            await self._client.aclose()
        log.info("webhook delivery %s stopped after %d deliveries", self.name, self.delivered)

    # -- waking up ------------------------------------------------------------------------------

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
                    self._wake.set()  # anything queued before LISTEN
                    delay = 0.5
                    async for _ in conn.notifies():
                        self._wake.set()
                finally:
                    with contextlib.suppress(Exception):
                        await conn.close()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("webhook delivery %s: LISTEN failed (%s); polling meanwhile", self.name, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    # -- claiming and attempting ------------------------------------------------------------------

    async def _loop(self) -> None:
        errors = 0
        while not self._stopping:
            self._wake.clear()
            try:
                await self._sweep_if_due()
                claimed, full = await self.claim_and_send()
                errors = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if is_schema_error(exc):  # not migrated yet: wait quietly (one line a minute)
                    now = time.monotonic()
                    if self._schema_logged_at is None or now - self._schema_logged_at >= SCHEMA_LOG_SECONDS:
                        self._schema_logged_at = now
                        log.warning(
                            "webhook delivery %s: the database schema is not migrated; delivery waits for `pie migrate`",
                            self.name,
                        )
                    await asyncio.sleep(SCHEMA_WAIT_SECONDS)
                    continue
                errors += 1
                log.warning("webhook delivery %s: claim failed: %s", self.name, str(exc).splitlines()[0][:200])
                await asyncio.sleep(min(0.5 * 2**errors, 30.0))
                continue
            if full:
                continue  # a full batch: more may be due right now
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.settings.webhooks_poll_interval)
            if self._inflight:
                await asyncio.sleep(CLAIM_COALESCE)  # more slots free meanwhile: one claim for them all

    async def claim_and_send(self) -> tuple[int, bool]:
        """Claim up to the free slots of due deliveries and start their attempts; (claimed, every
        free slot was filled)."""
        free = PREFETCH * self.settings.webhooks_concurrency - len(self._inflight)
        if free <= 0:
            return 0, False
        busy = [(str(w), n) for w, n in self._busy.items() if n > 0]
        rows = await self._execute(
            "claims",
            _CLAIM,
            {
                "per_webhook": PREFETCH * self.settings.webhooks_endpoint_concurrency,
                "busy_ids": [b[0] for b in busy],
                "busy_counts": [b[1] for b in busy],
                "limit": free,
                "lease": lease_seconds(self.settings),
            },
        )
        for row in rows:
            self._claimed.add(row.id)
            self._inflight[row.id] = row.webhook_id
            self._busy[row.webhook_id] += 1
            self._idle.clear()
            task = asyncio.create_task(self._attempt(row))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return len(rows), len(rows) == free

    def _slots(self, webhook_id: uuid.UUID) -> asyncio.Semaphore:
        slots = self._endpoint_slots.get(webhook_id)
        if slots is None:
            slots = self._endpoint_slots[webhook_id] = asyncio.Semaphore(self.settings.webhooks_endpoint_concurrency)
        return slots

    async def _attempt(self, row: Any) -> None:
        assert self._client is not None
        slots = self._slots(row.webhook_id)
        try:
            # the webhook's slot first, then a process slot: waiting for a busy receiver holds
            # no slot another webhook could use
            async with slots, self._process_slots:
                result = await attempt(self._client, self.settings, row)
        finally:
            self._inflight.pop(row.id, None)
            self._busy[row.webhook_id] -= 1
            if self._busy[row.webhook_id] <= 0:
                del self._busy[row.webhook_id]
                self._endpoint_slots.pop(row.webhook_id, None)  # nothing of it held: no waiter
            if not self._inflight:
                self._idle.set()
            self._wake.set()  # a slot is free
        await self._results.put(result)

    # -- recording --------------------------------------------------------------------------------

    async def _recorder(self) -> None:
        while True:
            self._recording = batch = [await self._results.get()]
            await asyncio.sleep(RESULT_LINGER)
            while len(batch) < RESULT_BATCH and not self._results.empty():
                batch.append(self._results.get_nowait())
            try:
                await self._record(batch, retry_for=lease_seconds(self.settings) / 2)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("webhook delivery %s: recording %d results failed", self.name, len(batch))
            self._recording = []

    async def _record(self, batch: list[Result], *, retry_for: float) -> None:
        """Record a batch in one transaction, retrying database errors for ``retry_for`` seconds
        (after that the deliveries' leases end and they are attempted again, with the same id)."""
        gone = sorted({str(r.webhook_id) for r in batch if r.outcome == "gone"})
        params: dict[str, Any] = {
            "ids": [r.delivery_id for r in batch],
            "outcomes": [r.outcome for r in batch],
            "codes": [r.status_code for r in batch],
            "errors": [r.error for r in batch],
            "responses": [r.response for r in batch],
            "delays": [r.delay for r in batch],
            "window": self.settings.webhooks_retry_hours * 3600.0,
            "gone": gone,
        }
        deadline = time.monotonic() + retry_for
        delay = 0.1
        while True:
            try:
                statuses = [row.status for row in await self._execute("results", _RECORD_AND_DISABLE, params)]
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if time.monotonic() + delay > deadline:
                    self._claimed.difference_update(r.delivery_id for r in batch)  # their leases recover them
                    log.error(
                        "webhook delivery %s: could not record %d results (%s); they will be attempted again",
                        self.name,
                        len(batch),
                        str(exc).splitlines()[0][:200],
                    )
                    return
                log.warning(
                    "webhook delivery %s: recording results failed (%s); retrying", self.name, exc.__class__.__name__
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        self._claimed.difference_update(r.delivery_id for r in batch)
        ended = [s for s in statuses if s != "pending"]
        self.delivered += sum(1 for s in ended if s == "delivered")
        metrics.webhook_deliveries_ended(ended)
        for webhook_id in gone:
            log.warning("webhook %s disabled: its receiver answered 410 Gone", webhook_id)

    async def _execute(self, purpose: str, sql: str, params: dict[str, Any]) -> list[Any]:
        """Run one statement on this loop's own autocommit connection for ``purpose`` (opened on
        first use; a connection that failed is closed and opened again next time)."""
        conn = self._conns.get(purpose)
        if conn is None or conn.closed:
            conn = self._conns[purpose] = await db.connect(self.settings, autocommit=True, row_factory=namedtuple_row)
        try:
            cursor = await conn.execute(sql, params)
            return await cursor.fetchall() if cursor.description else []
        except BaseException:
            self._conns.pop(purpose, None)
            with contextlib.suppress(Exception):
                await conn.close()
            raise

    # -- retention --------------------------------------------------------------------------------

    async def _sweep_if_due(self) -> None:
        now = time.monotonic()
        if now - self._last_sweep < SWEEP_INTERVAL:
            return
        self._last_sweep = now
        async with db.get_engine().begin() as conn:
            deleted = (
                await conn.execute(_SWEEP, {"seconds": self.settings.webhooks_retention_days * 86400.0})
            ).rowcount
        if deleted:
            log.info("webhook delivery %s: %d events past the retention deleted", self.name, deleted)


async def start_delivery(settings: Settings, name: str) -> Deliverer | None:
    """Start this process's delivery loop (None when ``PIE_WEBHOOKS_DELIVER`` is false)."""
    if not settings.webhooks_deliver:
        return None
    deliverer = Deliverer(settings, name=name)
    await deliverer.start()
    return deliverer
