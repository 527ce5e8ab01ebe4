"""The Alembic migration: upgrade / downgrade / upgrade on an empty database, and no drift
between the ORM models and the migration (what `alembic check` reports)."""

from __future__ import annotations

import subprocess

import psycopg
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from conftest import clean_subprocess_env, pie_command
from sqlalchemy import create_engine, inspect, pool, text

from pie.db import async_url, libpq_url
from pie.migrate import alembic_config, downgrade, upgrade
from pie.models_all import Base


def snapshot(url: str) -> tuple[set[str], bool, str | None]:
    """(tables, pie_uuid7() exists, alembic revision)."""
    with psycopg.connect(libpq_url(url)) as conn:
        tables = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
        has_fn = conn.execute("SELECT count(*) FROM pg_proc WHERE proname = 'pie_uuid7'").fetchone()[0] == 1
        revision = None
        if "alembic_version" in tables:
            row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
            revision = row[0] if row else None
    return tables - {"alembic_version"}, has_fn, revision


def model_tables() -> set[str]:
    return {t.name for t in Base.metadata.sorted_tables}


def head_revision(url: str) -> str:
    return ScriptDirectory.from_config(alembic_config(url)).get_current_head()


def test_upgrade_downgrade_upgrade_on_an_empty_database(scratch_url):
    assert snapshot(scratch_url) == (set(), False, None)
    upgrade(scratch_url)
    tables, has_fn, revision = snapshot(scratch_url)
    assert tables == model_tables() and has_fn and revision == head_revision(scratch_url)

    downgrade(scratch_url, "base")
    assert snapshot(scratch_url) == (set(), False, None)

    upgrade(scratch_url)
    assert snapshot(scratch_url) == (model_tables(), True, head_revision(scratch_url))
    # and the migrated schema works: the SQL-generated job id is a UUIDv7
    with psycopg.connect(libpq_url(scratch_url)) as conn:
        value = conn.execute("SELECT pie_uuid7()").fetchone()[0]
    assert value.version == 7


def test_models_and_migration_do_not_drift(scratch_url):
    upgrade(scratch_url)
    engine = create_engine(async_url(scratch_url), poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
            assert diff == [], f"models and migrations/versions differ: {diff}"
            # every table the models declare is there with every column
            inspector = inspect(conn)
            for table in Base.metadata.sorted_tables:
                assert {c["name"] for c in inspector.get_columns(table.name)} == set(table.columns.keys())
            assert conn.execute(text("SELECT count(*) FROM clients")).scalar_one() == 0
    finally:
        engine.dispose()
    # the same check through Alembic's own command (raises on drift)
    command.check(alembic_config(scratch_url))


def test_upgrade_is_idempotent(scratch_url):
    upgrade(scratch_url)
    upgrade(scratch_url)  # already at head: a no-op, not an error
    assert snapshot(scratch_url)[2] == head_revision(scratch_url)


def test_concurrent_migrations_serialise(scratch_url, tmp_path):
    """Replicas starting together (each runs the migration) do not trip over each other."""
    env = clean_subprocess_env(PIE_DATABASE_URL=scratch_url, PIE_DATA_DIR=str(tmp_path))
    procs = [
        subprocess.Popen(
            [*pie_command(), "migrate"],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(3)
    ]
    outputs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(outputs)
    assert snapshot(scratch_url) == (model_tables(), True, head_revision(scratch_url))
