"""The thread pool in-process handlers run in.

Why not ``concurrent.futures.ThreadPoolExecutor``: the interpreter joins its threads at exit,
so one handler still running after the shutdown grace period would keep the process (and the
embedded database) up until it returns, although its job was already released to the queue.
These threads are daemons: a stopping server leaves such a handler behind and exits.

Besides ``submit`` (a future per call), :meth:`DaemonThreadPool.run_soon` hands results back to
the event loop in batches: a call's result goes onto a queue and the loop is woken once for
whatever is there when it runs (not once per call), so sixteen handlers that end together cost
the loop one wake-up, not sixteen future callbacks.
"""

from __future__ import annotations

import asyncio
import collections
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any


class DaemonThreadPool(Executor):
    def __init__(self, max_workers: int, thread_name_prefix: str = "pie-job"):
        self._max = max(max_workers, 1)
        self._prefix = thread_name_prefix
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = threading.Semaphore(0)
        self._lock = threading.Lock()
        self._shutdown = False
        # run_soon: results waiting for the loop, and whether the loop was already woken for them
        self._ready: collections.deque[Any] = collections.deque()
        self._signalled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._deliver: Callable[[list[Any]], None] | None = None

    def deliver_to(self, loop: asyncio.AbstractEventLoop, deliver: Callable[[list[Any]], None]) -> None:
        """Where :meth:`run_soon` results go: ``deliver(results)`` runs on ``loop``."""
        self._loop, self._deliver = loop, deliver

    def run_soon(self, fn: Callable[..., Any], /, *args: Any) -> None:
        """Run ``fn(*args)`` in a worker; its return value is handed to the ``deliver_to``
        callback on the loop, batched with the others that ended meanwhile. ``fn`` must not
        raise (it returns its failure as a value)."""
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new work after shutdown")
            self._queue.put((None, fn, args, None))
            self._grow()

    def _flush(self) -> None:
        """On the loop: hand over every result that arrived (the flag is cleared first, so a
        result appended after it wakes the loop again; none is left behind)."""
        self._signalled = False
        ready = []
        while self._ready:
            ready.append(self._ready.popleft())
        if ready and self._deliver is not None:
            self._deliver(ready)

    def _grow(self) -> None:
        if not self._idle.acquire(blocking=False) and len(self._threads) < self._max:
            thread = threading.Thread(target=self._work, name=f"{self._prefix}_{len(self._threads)}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new work after shutdown")
            future: Future[Any] = Future()
            self._queue.put((future, fn, args, kwargs))
            self._grow()
            return future

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            future, fn, args, kwargs = item
            if future is None:  # run_soon: the result goes back in a batch
                self._ready.append(fn(*args))
                if not self._signalled and self._loop is not None:
                    self._signalled = True
                    try:
                        self._loop.call_soon_threadsafe(self._flush)
                    except RuntimeError:  # the loop is closed: nobody waits for it any more
                        pass
            elif future.set_running_or_notify_cancel():
                try:
                    result = fn(*args, **kwargs)
                except BaseException as exc:  # handed to the caller through the future
                    future.set_exception(exc)
                else:
                    future.set_result(result)
            del item, future
            self._idle.release()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            if cancel_futures:
                while True:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is not None and item[0] is not None:
                        item[0].cancel()
            for _ in self._threads:
                self._queue.put(None)
        if wait:
            for thread in self._threads:
                thread.join()
