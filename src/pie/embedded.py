"""The embedded PostgreSQL (pgserver) used when PIE_DATABASE_URL is unset."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("pie.embedded")

_servers: dict[str, object] = {}


def start_embedded(data_dir: Path) -> str:
    """Start (or attach to) the embedded server under ``data_dir/pgdata``; return its URL."""
    import pgserver

    pgdata = (Path(data_dir) / "pgdata").resolve()
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    key = str(pgdata)
    if key not in _servers:
        log.info("starting embedded PostgreSQL in %s", pgdata)
        _servers[key] = pgserver.get_server(pgdata, cleanup_mode="stop")
    return _servers[key].get_uri()  # type: ignore[attr-defined]


def resolve_database_url(settings, *, migrate: bool = True) -> str:
    """PIE_DATABASE_URL, or the embedded database (migrated to head)."""
    if settings.database_url:
        return settings.database_url
    url = start_embedded(settings.data_dir)
    if migrate:
        from pie.migrate import upgrade

        upgrade(url)
    return url
