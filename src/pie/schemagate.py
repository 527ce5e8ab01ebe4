"""Whether the database schema is migrated, as far as this process knows.

``pie serve --no-migrate`` (or a database someone emptied) can face a schema older than the
code: every API call would fail with "relation does not exist". Instead, while the schema is
known not to be at a revision this code can use, ``/v2/health`` answers 503 with the reason,
API requests the 503 envelope "database schema not migrated ...", and dispatchers wait quietly.

The state is checked once when the application starts and then, only while it is wrong, every
few seconds until ``pie migrate`` has run: a migrated server pays nothing per request (one
attribute test). A database error naming a missing table or column is told apart from a bug by
:func:`is_schema_error` (the 503 envelope instead of a 500 and a traceback).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

from sqlalchemy import text

log = logging.getLogger("pie.schema")

# undefined_table, undefined_column, undefined_object (a type), undefined_function
SCHEMA_SQLSTATES = frozenset({"42P01", "42703", "42704", "42883"})
NOT_MIGRATED = "database schema not migrated"
RECHECK_SECONDS = 2.0
# paths that answer while the schema is not migrated (they do not need it)
_OPEN_PREFIXES = ("/v2/health", "/v2/docs", "/v2/redoc", "/v2/openapi.json", "/console/static")


# A background loop (dispatcher, webhook delivery) meeting an unmigrated schema (`pie serve
# --no-migrate`, `pie worker` before `pie migrate`) looks again this often and says so once a minute
SCHEMA_WAIT_SECONDS = 5.0
SCHEMA_LOG_SECONDS = 60.0


def is_schema_error(exc: BaseException) -> bool:
    """A database error saying a table, column, type or function the code uses is missing."""
    orig = getattr(exc, "orig", exc)
    return getattr(orig, "sqlstate", None) in SCHEMA_SQLSTATES


@functools.lru_cache(maxsize=1)
def _revisions() -> tuple[str, frozenset[str]]:
    """(the head revision, every revision this code's migrations know)."""
    from alembic.script import ScriptDirectory

    from pie.migrate import alembic_config, head_revision

    script = ScriptDirectory.from_config(alembic_config(""))
    return head_revision(), frozenset(r.revision for r in script.walk_revisions())


def describe(revisions: list[str]) -> str | None:
    """Why a database at ``revisions`` cannot serve this code, or None when it can (at the
    head, or at a revision newer than this code knows: a rolling deploy's older replica)."""
    head, known = _revisions()
    if not revisions:
        return f"{NOT_MIGRATED} (no alembic_version table): run `pie migrate`"
    if len(revisions) == 1 and revisions[0] == head:
        return None
    if any(r in known for r in revisions):
        return f"{NOT_MIGRATED} (at revision {', '.join(revisions)}, this server needs {head}): run `pie migrate`"
    return None


async def database_revisions(engine: Any) -> list[str]:
    async with engine.connect() as conn:
        exists = (await conn.execute(text("SELECT to_regclass('alembic_version') IS NOT NULL"))).scalar()
        if not exists:
            return []
        return sorted(r[0] for r in (await conn.execute(text("SELECT version_num FROM alembic_version"))).all())


class SchemaGate:
    """This process's knowledge: ``problem`` is the reason while the schema is known not to be
    migrated, else None (migrated, or not checked)."""

    def __init__(self) -> None:
        self.problem: str | None = None

    def refuses(self, path: str) -> bool:
        """True when a request for ``path`` must get the 503 envelope now."""
        return self.problem is not None and path != "/" and not path.startswith(_OPEN_PREFIXES)

    async def check(self, engine: Any) -> str | None:
        revisions = await database_revisions(engine)
        self.problem = await asyncio.to_thread(describe, revisions)
        return self.problem

    async def start(self, engine: Any, interval: float = RECHECK_SECONDS) -> asyncio.Task[None] | None:
        """Check now (before the first request); while the schema is not migrated, a task
        checks again every ``interval`` seconds until it is. A database that cannot be reached
        now leaves the gate open (requests then get the database's own errors)."""
        try:
            problem = await self.check(engine)
        except Exception as exc:
            log.warning("could not check the database schema: %s", str(exc).splitlines()[0][:200])
            return None
        if problem is None:
            return None
        log.warning("%s; API requests answer 503 until it is", problem)
        return asyncio.create_task(self._recheck(engine, interval), name="pie-schema-gate")

    async def _recheck(self, engine: Any, interval: float) -> None:
        while self.problem is not None:
            await asyncio.sleep(interval)
            try:
                await self.check(engine)
            except Exception:  # the database is away: keep the last answer, try again
                continue
        log.info("database schema migrated: serving requests")

    def reset(self) -> None:
        self.problem = None


gate = SchemaGate()
