"""Dispatcher liveness: registration in ``dispatchers``, the heartbeat, and which peers are dead
(only judged after our own heartbeats succeeded for ``dispatch_dead_after``)."""

from __future__ import annotations

import asyncio
import logging
import os
import time

from pie import db
from pie.dispatch.state import DispatcherState
from pie.dispatch.statements import _HEARTBEAT

log = logging.getLogger("pie.dispatch")


def _process_gone(pid: int) -> bool:
    """True if no process ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OSError):
        return False
    return False


class Liveness(DispatcherState):
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
