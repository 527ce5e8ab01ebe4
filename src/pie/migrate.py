"""Run Alembic migrations programmatically (``pie migrate``, ``pie serve``, tests).

The migration scripts are maintained in the repository's top-level ``migrations/`` (with
``alembic.ini``); a built wheel carries a copy as ``pie/_migrations`` (see ``setup.py``), so an
installed package migrates from any working directory.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory

PACKAGE_DIR = Path(__file__).resolve().parent
# the source checkout (editable install): <root>/src/pie/migrate.py
ROOT = PACKAGE_DIR.parents[1]


class MigrationsNotFound(RuntimeError):
    pass


def migrations_dir() -> Path:
    """The Alembic script directory: the source checkout's ``migrations/`` (editable install),
    else the copy packaged in the wheel."""
    for candidate in (ROOT / "migrations", PACKAGE_DIR / "_migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise MigrationsNotFound(
        f"cannot find the Alembic migrations (looked in {ROOT / 'migrations'} and "
        f"{PACKAGE_DIR / '_migrations'}); reinstall the package"
    )


def alembic_config(database_url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.attributes["database_url"] = database_url
    return cfg


def upgrade(database_url: str, revision: str = "head") -> None:
    """Migrate to ``revision`` under the advisory lock (concurrent callers migrate once)."""
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(database_url), revision)


def head_revision() -> str:
    """The head revision of the migrations this package carries (several heads: joined by ',')."""
    heads = ScriptDirectory.from_config(alembic_config("")).get_heads()
    return ",".join(sorted(heads))


def current_revision(database_url: str) -> str:
    """The revision the database is at ('' for an empty, never migrated database)."""
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy import create_engine, pool

    from pie.db import async_url

    url = async_url(database_url)
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            heads = MigrationContext.configure(conn).get_current_heads()
    finally:
        engine.dispose()
    return ",".join(sorted(heads))
