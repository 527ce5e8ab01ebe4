"""The dispatcher's state: its settings, identity, pools, and the sets of jobs in its hands
(``pie.dispatch.dispatcher`` describes the pipeline). Every step of the dispatcher extends it:
``liveness`` < ``recording`` < ``claiming`` < ``sweeper`` < ``dispatcher``."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from typing import Any

import psycopg

from pie import callbacks
from pie.config import Settings
from pie.dispatch.backends import AwsBackends
from pie.dispatch.inprocess import JobContext
from pie.dispatch.threads import DaemonThreadPool
from pie.jobs.logic import Completion


class DispatcherState:
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
