"""Run Alembic migrations programmatically (``pie migrate``, ``pie serve``, tests)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

# the source checkout (editable install): <root>/src/pie/migrate.py
ROOT = Path(__file__).resolve().parents[2]


class MigrationsNotFound(RuntimeError):
    pass


def migrations_root() -> Path:
    """The directory holding ``migrations/``: the source checkout, or (a regular install, e.g.
    the Docker image) the working directory the project was copied to."""
    for candidate in (ROOT, Path.cwd()):
        if (candidate / "migrations" / "env.py").is_file():
            return candidate
    raise MigrationsNotFound(
        f"cannot find the Alembic migrations (looked in {ROOT} and {Path.cwd()}); "
        "run from the project directory"
    )


def alembic_config(database_url: str) -> Config:
    root = migrations_root()
    ini = root / "alembic.ini"
    cfg = Config(str(ini)) if ini.exists() else Config()
    cfg.set_main_option("script_location", str(root / "migrations"))
    cfg.attributes["database_url"] = database_url
    return cfg


def upgrade(database_url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(database_url), revision)


def head_revision() -> str | None:
    """The revision id at the head of the migration scripts (None: no migrations)."""
    from alembic.script import ScriptDirectory

    root = migrations_root()
    return ScriptDirectory(str(root / "migrations")).get_current_head()


def current_revision(database_url: str) -> str | None:
    """The revision ``database_url``'s schema is at (None: never migrated)."""
    import sqlalchemy as sa
    from alembic.runtime.migration import MigrationContext

    from pie.db import libpq_url

    engine = sa.create_engine(libpq_url(database_url).replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()
