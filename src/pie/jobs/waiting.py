"""Long-polling ``GET /v2/jobs/{job_id}?wait=N`` without holding a database transaction.

Every end of a job is announced with ``NOTIFY pie_job_done, '<job_id>'`` (see
``pie.jobs.logic.finish_jobs``). While at least one request is waiting, one LISTEN connection
per process wakes the waiters of the jobs that ended; each waiter re-reads its job in a short
session of its own. If the LISTEN connection cannot be opened the waiters fall back to polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import psycopg

from pie import db
from pie.jobs.logic import DONE_CHANNEL

log = logging.getLogger("pie.jobs.waiting")

T = TypeVar("T")

# re-read at least this often even without a notification (covers a lost LISTEN connection)
FALLBACK_POLL_SECONDS = 0.5


class _DoneListener:
    """One LISTEN connection shared by every waiter of this process, open while anyone waits."""

    def __init__(self) -> None:
        self.waiters: dict[str, set[asyncio.Event]] = {}
        self.task: asyncio.Task[None] | None = None
        self.ready: asyncio.Event | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def _ensure_running(self) -> None:
        loop = asyncio.get_running_loop()
        if self.task is None or self.task.done() or self.loop is not loop:
            self.loop = loop
            self.ready = asyncio.Event()
            self.task = loop.create_task(self._listen(self.ready), name="pie-job-done-listener")

    async def _listen(self, ready: asyncio.Event) -> None:
        try:
            conn = await psycopg.AsyncConnection.connect(db.get_database_url(), autocommit=True)
        except Exception as exc:  # polling still works
            log.warning("cannot LISTEN for job ends (%s); waiting requests poll instead", exc)
            ready.set()
            return
        try:
            await conn.execute(f"LISTEN {DONE_CHANNEL}")
            ready.set()
            async for notify in conn.notifies():
                for event in self.waiters.get(notify.payload, ()):
                    event.set()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("job-end listener stopped: %s", exc)
        finally:
            ready.set()
            with contextlib.suppress(Exception):
                await conn.close()

    async def subscribe(self, job_id: str) -> asyncio.Event:
        event = asyncio.Event()
        self.waiters.setdefault(job_id, set()).add(event)
        self._ensure_running()
        assert self.ready is not None
        # wait until LISTEN is in place, so an end committed after our next read is not missed
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.ready.wait(), timeout=2.0)
        return event

    async def unsubscribe(self, job_id: str, event: asyncio.Event) -> None:
        events = self.waiters.get(job_id)
        if events is not None:
            events.discard(event)
            if not events:
                del self.waiters[job_id]
        if not self.waiters and self.task is not None:
            task, self.task = self.task, None
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


_listener = _DoneListener()


async def wait_for_end(
    job_id: str, seconds: float, read: Callable[[], Awaitable[T]], ended: Callable[[T], bool]
) -> T:
    """Re-read the job (``read`` opens its own short session) until ``ended`` or time is up."""
    deadline = time.monotonic() + seconds
    event = await _listener.subscribe(job_id)
    try:
        while True:
            event.clear()  # before reading: an end announced after this read still wakes us
            value = await read()
            remaining = deadline - time.monotonic()
            if ended(value) or remaining <= 0:
                return value
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(event.wait(), timeout=min(remaining, FALLBACK_POLL_SECONDS))
    finally:
        await _listener.unsubscribe(job_id, event)
