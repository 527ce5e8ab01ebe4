"""Long-polling ``GET /v2/jobs/{job_id}?wait=N`` without polling and without holding a
database connection while waiting.

Every end of a job is announced with ``NOTIFY pie_job_done, '<job_id>'`` (see
``pie.jobs.logic.finish_jobs``). One LISTEN connection per process (opened by the first
long-poll, kept until the application stops, re-opened after a failure) fans the notifications
out to in-memory waiters. A waiter reads its job once when it starts waiting, then once more
when it is woken (its job ended, the LISTEN connection was re-opened and ends may have been
missed, or the server is shutting down) or when its time is up. Nothing polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import psycopg

from pie import db, metrics
from pie.jobs.channels import DONE_CHANNEL

log = logging.getLogger("pie.jobs.waiting")

T = TypeVar("T")

# how long a waiter waits for the LISTEN connection before its first read (it then reads
# anyway and relies on the re-read that follows a (re)connection)
CONNECT_WAIT_SECONDS = 2.0
RECONNECT_MAX_SECONDS = 5.0


class JobEndListener:
    """The process's LISTEN connection and its waiters (job id -> events)."""

    def __init__(self) -> None:
        self.waiters: dict[str, set[asyncio.Event]] = {}
        self.task: asyncio.Task[None] | None = None
        self.connected: asyncio.Event | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.closing = False

    def _ensure_running(self) -> asyncio.Event:
        loop = asyncio.get_running_loop()
        if self.task is None or self.task.done() or self.loop is not loop:
            self.loop = loop
            self.connected = asyncio.Event()
            self.task = loop.create_task(self._run(self.connected), name="pie-job-end-listener")
        assert self.connected is not None
        return self.connected

    async def _run(self, connected: asyncio.Event) -> None:
        delay = 0.2
        first = True
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(db.get_database_url(), autocommit=True)
                try:
                    await conn.execute(f"LISTEN {DONE_CHANNEL}")
                    connected.set()
                    delay = 0.2
                    if not first:  # ends announced while we were away: everybody reads again
                        self.wake_all()
                    first = False
                    async for notify in conn.notifies():
                        for event in self.waiters.get(notify.payload, ()):
                            event.set()
                finally:
                    connected.clear()
                    with contextlib.suppress(Exception):
                        await conn.close()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("job-end listener: %s; reconnecting in %.1fs", exc, delay)
                first = False
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX_SECONDS)

    def subscribe(self, job_id: str) -> asyncio.Event:
        event = asyncio.Event()
        self.waiters.setdefault(job_id, set()).add(event)
        self._ensure_running()
        return event

    def unsubscribe(self, job_id: str, event: asyncio.Event) -> None:
        events = self.waiters.get(job_id)
        if events is not None:
            events.discard(event)
            if not events:
                del self.waiters[job_id]

    def wake_all(self) -> None:
        for events in self.waiters.values():
            for event in events:
                event.set()

    def shutdown(self) -> None:
        """The server is stopping: every waiter answers at once with its job as it is, and new
        long-polls answer without waiting."""
        self.closing = True
        self.wake_all()

    async def close(self) -> None:
        self.shutdown()
        task, self.task = self.task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def reset(self) -> None:
        """For a new application in the same process (tests)."""
        self.closing = False


listener = JobEndListener()


async def wait_for_end(job_id: str, seconds: float, read: Callable[[], Awaitable[T]], ended: Callable[[T], bool]) -> T:
    """Read the job (``read`` opens its own short session; its exceptions propagate) and, unless
    ``ended``, wait up to ``seconds`` for its end, reading it once more when woken or at time-out."""
    if listener.closing:
        return await read()
    deadline = time.monotonic() + seconds
    event = listener.subscribe(job_id)
    metrics.LONG_POLLS.inc()
    try:
        connected = listener._ensure_running()
        if not connected.is_set():
            # the first long-poll of the process: LISTEN must be in place before the read, or
            # an end committed in between would be missed (a later (re)connection wakes us too)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(connected.wait(), timeout=min(CONNECT_WAIT_SECONDS, seconds))
        value = await read()
        while not ended(value) and not listener.closing:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return value
            try:
                await asyncio.wait_for(event.wait(), timeout=remaining)
            except TimeoutError:
                return await read()
            event.clear()
            value = await read()
        return value
    finally:
        metrics.LONG_POLLS.dec()
        listener.unsubscribe(job_id, event)
