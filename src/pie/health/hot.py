"""The hot read of health (docs/architecture.md: Fast paths): ``GET /v2/health`` is the
route's own function, without the routing around it (no token: a public read)."""

from __future__ import annotations

from collections.abc import Mapping

from pie.auth import Principal
from pie.health.routes import health
from pie.http.fast import HotRead, ReadAnswer


async def _health(_principal: Principal | None, _params: Mapping[str, str]) -> ReadAnswer:
    """The route's function (``SELECT 1`` through the pool; 200, or the 503 it logs)."""
    return await health()


HOT_READS = {"health": HotRead(_health, public=True)}
