"""``pie worker``: a standalone dispatcher process (run as many as you like, anywhere)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from pie import db
from pie.config import Settings
from pie.dispatch.dispatcher import Dispatcher
from pie.logconfig import announce
from pie.webhooks.delivery import start_delivery

log = logging.getLogger("pie.worker")


async def run_worker(settings: Settings, name: str | None = None) -> None:
    """Dispatch jobs until SIGINT/SIGTERM, then stop gracefully (running in-process jobs get a
    few seconds to finish; the rest go back to the queue)."""
    from pie.embedded import resolve_database_url

    owns_engine = False
    try:
        db.get_engine()
    except RuntimeError:
        db.init_engine(resolve_database_url(settings), settings)
        owns_engine = True
    dispatcher = Dispatcher(settings, name=name or "worker")  # the id adds host and pid
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    await dispatcher.start()
    webhooks = await start_delivery(settings, dispatcher.worker_id)  # the webhook delivery loop beside it
    announce(f"pie worker {dispatcher.worker_id} dispatching", logger="pie.worker")
    try:
        await stop.wait()
    finally:
        log.info("stopping worker %s", dispatcher.worker_id)
        await dispatcher.stop(grace=settings.shutdown_grace_seconds)
        if webhooks is not None:
            await webhooks.stop(grace=min(settings.shutdown_grace_seconds, 5.0))
        if owns_engine:
            await db.dispose_engine()
