"""Alembic environment: migrates the database named by PIE_DATABASE_URL (or a passed connection)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, create_engine, pool, text

from pie.db import async_url
from pie.models_all import Base

config = context.config
target_metadata = Base.metadata

# Session-level advisory lock held while migrating: several `pie serve` replicas (or a serve and
# a `pie migrate`) starting together migrate one after the other; the later ones find the head.
MIGRATION_LOCK_KEY = 0x5049455F4D4947  # "PIE_MIG"


def _url() -> str:
    url = config.attributes.get("database_url") or config.get_main_option("sqlalchemy.url")
    if not url:
        from pie.config import get_settings

        url = get_settings().database_url
    if not url:
        raise RuntimeError("set PIE_DATABASE_URL (or use `pie migrate`, which also handles the embedded database)")
    return async_url(url)


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def _migrate_locked(conn: Connection) -> None:
    conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
    conn.commit()  # the lock outlives this transaction; the migration runs in its own
    try:
        context.configure(connection=conn, target_metadata=target_metadata)
        with context.begin_transaction():
            context.run_migrations()
        conn.commit()
    finally:
        conn.rollback()
        conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK_KEY})
        conn.commit()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, target_metadata=target_metadata)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = create_engine(_url(), poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            _migrate_locked(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
