"""Which tenant a machine token acts for (spec 14.2).

A machine token's ``client_id`` claim is a Cognito app-client id. Its tenant is the client
whose ``app_client_ids`` holds that id; else (development tokens minted by ``pie token``) the
client whose ``client_id`` equals the claim; else none (a platform caller, e.g. a worker).

This runs on every request of a machine token, so it is one query over two primary keys and
its answers are cached per process for ``PIE_TENANT_CACHE_SECONDS``. A change to the mapping
clears this process's cache when it commits; other processes see it within the cache time.
"""

from __future__ import annotations

from typing import Any

from cachetools import TTLCache
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncSession

from pie import db

_LOOKUP = text(
    """
    SELECT client_id FROM (
        SELECT client_id, 0 AS rank FROM client_app_clients WHERE app_client_id = :claim
        UNION ALL
        SELECT client_id, 1 AS rank FROM clients WHERE client_id = :claim
    ) AS found ORDER BY rank LIMIT 1
    """
)


_MISSING: Any = object()


class TenantCache:
    """claim -> tenant (or None), a ``cachetools.TTLCache`` whose time-to-live follows the
    setting (a changed ``PIE_TENANT_CACHE_SECONDS`` starts a fresh cache; 0 caches nothing)."""

    def __init__(self, max_entries: int = 10_000):
        self.max_entries = max_entries
        self._cache: TTLCache[str, str | None] = TTLCache(max_entries, 1.0)

    def get(self, claim: str, ttl: float) -> tuple[bool, str | None]:
        if ttl <= 0:
            return False, None
        if self._cache.ttl != ttl:
            self._cache = TTLCache(self.max_entries, ttl)
        found = self._cache.get(claim, _MISSING)
        return (False, None) if found is _MISSING else (True, found)

    def put(self, claim: str, tenant: str | None, ttl: float) -> None:
        if ttl > 0 and self._cache.ttl == ttl:
            self._cache[claim] = tenant

    def clear(self, *_: Any) -> None:
        self._cache.clear()


cache = TenantCache()


async def tenant_of_app_client(claim: str, ttl: float) -> str | None:
    """The tenant of a machine token whose ``client_id`` claim is ``claim`` (None: no tenant)."""
    hit, tenant = cache.get(claim, ttl)
    if hit:
        return tenant
    async with db.get_engine().connect() as conn:
        tenant = (await conn.execute(_LOOKUP, {"claim": claim})).scalar()
    cache.put(claim, tenant, ttl)
    return tenant


def forget_on_commit(session: AsyncSession) -> None:
    """Clear the cache when ``session``'s transaction commits (a client or its app clients
    changed), so this process never acts on the old mapping after the change is visible."""
    event.listen(session.sync_session, "after_commit", cache.clear, once=True)
    cache.clear()
