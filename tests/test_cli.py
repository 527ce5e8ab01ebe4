"""The `pie` command line (spec 11): `pie token` flags produce tokens the app accepts with the
right permissions; `pie migrate` migrates a scratch database up and down."""

from __future__ import annotations

import socket
import subprocess
import uuid

import psycopg
import pytest
from conftest import _with_dbname, clean_subprocess_env, pie_command
from jose import jwt

from pie.cli import main
from pie.db import libpq_url


def token_from_cli(capsys, *args: str) -> str:
    assert main(["token", *args]) == 0
    out = capsys.readouterr().out.strip()
    assert out.count(".") == 2 and "\n" not in out
    return out


def claims(token: str) -> dict:
    return jwt.get_unverified_claims(token)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
async def sealink(client, admin):
    for cid in ("sealink", "other"):
        assert (
            await client.post("/v2/clients", json={"client_id": cid, "name": cid}, headers=admin)
        ).status_code == 201


async def test_token_admin(client, capsys, sealink, settings):
    token = token_from_cli(capsys, "--admin")
    c = claims(token)
    assert c["scope"] == "streamline/admin" and c["iss"] == settings.jwt_issuer and c["token_use"] == "access"
    r = await client.get("/v2/clients", headers=bearer(token))
    assert r.status_code == 200 and [x["client_id"] for x in r.json()] == ["other", "sealink"]
    r = await client.post("/v2/clients", json={"client_id": "new", "name": "New"}, headers=bearer(token))
    assert r.status_code == 201


async def test_token_scope_and_client_id(client, capsys, sealink):
    token = token_from_cli(capsys, "--scope", "read_domains", "--client-id", "sealink")
    assert claims(token)["scope"] == "streamline/read_domains" and claims(token)["client_id"] == "sealink"
    r = await client.get("/v2/clients", headers=bearer(token))
    assert [x["client_id"] for x in r.json()] == ["sealink"]
    assert (await client.get("/v2/clients/other", headers=bearer(token))).status_code == 403
    assert (
        await client.post("/v2/clients", json={"client_id": "n", "name": "N"}, headers=bearer(token))
    ).status_code == 403


async def test_token_repeated_and_prefixed_scopes(client, capsys, sealink):
    token = token_from_cli(
        capsys, "--scope", "streamline/read_models", "--scope", "read_domains", "--client-id", "sealink"
    )
    assert claims(token)["scope"].split() == ["streamline/read_models", "streamline/read_domains"]
    assert (await client.get("/v2/clients/sealink", headers=bearer(token))).status_code == 200


async def test_token_human_groups(client, capsys, sealink):
    token = token_from_cli(capsys, "--group", "client:sealink", "--username", "bob")
    c = claims(token)
    assert c["cognito:groups"] == ["client:sealink"] and c["username"] == "bob" and "scope" not in c
    r = await client.get("/v2/clients", headers=bearer(token))
    assert [x["client_id"] for x in r.json()] == ["sealink"]
    assert (await client.patch("/v2/clients/sealink", json={"name": "x"}, headers=bearer(token))).status_code == 403

    token = token_from_cli(capsys, "--group", "admin", "--group", "client:other", "--username", "alice")
    assert claims(token)["cognito:groups"] == ["admin", "client:other"]
    assert (await client.patch("/v2/clients/sealink", json={"name": "x"}, headers=bearer(token))).status_code == 200


async def test_token_without_flags_has_no_permissions(client, capsys, sealink):
    token = token_from_cli(capsys)
    assert claims(token)["sub"] == "pie-dev-user"
    r = await client.get("/v2/clients", headers=bearer(token))
    assert r.status_code == 403


async def test_token_ttl_and_sub(client, capsys):
    token = token_from_cli(capsys, "--admin", "--ttl", "120", "--sub", "svc-42")
    c = claims(token)
    assert c["exp"] - c["iat"] == 120 and c["sub"] == "svc-42"
    assert (await client.get("/v2/clients", headers=bearer(token))).status_code == 200
    expired = token_from_cli(capsys, "--admin", "--ttl", "-5")
    r = await client.get("/v2/clients", headers=bearer(expired))
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"


def test_token_refuses_without_a_development_secret(tmp_path):
    """Production (Cognito configured, no PIE_JWT_SECRET): PIE never mints tokens."""
    env = clean_subprocess_env(
        PIE_COGNITO_REGION="ap-southeast-2", PIE_COGNITO_USER_POOL_ID="ap-southeast-2_X", PIE_DATA_DIR=str(tmp_path)
    )
    result = subprocess.run(
        [*pie_command(), "token", "--admin"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2 and result.stdout == ""
    assert "PIE_JWT_SECRET" in result.stderr
    assert not (tmp_path / "dev-jwt-secret").exists()


def test_token_uses_pie_jwt_secret_and_issuer(tmp_path):
    env = clean_subprocess_env(PIE_JWT_SECRET="cli-secret", PIE_JWT_ISSUER="my-issuer", PIE_DATA_DIR=str(tmp_path))
    result = subprocess.run(
        [*pie_command(), "token", "--scope", "read_models"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    c = jwt.decode(result.stdout.strip(), "cli-secret", algorithms=["HS256"], issuer="my-issuer")
    assert c["scope"] == "streamline/read_models"


def test_migrate_against_a_scratch_database(database_url, tmp_path):
    server_url = _with_dbname(database_url, "postgres")
    name = f"pie_cli_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = _with_dbname(database_url, name)

    def tables() -> set[str]:
        with psycopg.connect(libpq_url(url)) as conn:
            return {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}

    def pie(*args: str) -> subprocess.CompletedProcess[str]:
        env = clean_subprocess_env(PIE_DATABASE_URL=url, PIE_DATA_DIR=str(tmp_path))
        return subprocess.run(
            [*pie_command(), *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
        )

    try:
        result = pie("migrate")
        assert result.returncode == 0, result.stderr
        assert "up to head" in result.stdout
        assert {"clients", "jobs", "models", "alembic_version"} <= tables()
        result = pie("migrate", "--down")
        assert result.returncode == 0, result.stderr
        assert "down to base" in result.stdout
        assert tables() == {"alembic_version"}
        assert pie("migrate", "head").returncode == 0
        assert "clients" in tables()
        # a bad revision is a clear error exit, not a traceback
        result = pie("migrate", "nonexistent-revision")
        assert result.returncode == 2 and "nonexistent-revision" in result.stderr and "Traceback" not in result.stderr
    finally:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_migrate_unreachable_database_is_a_clear_error(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = clean_subprocess_env(
        PIE_DATABASE_URL=f"postgresql://postgres@127.0.0.1:{port}/nope",
        PIE_DATA_DIR=str(tmp_path),
        PIE_DB_STARTUP_TIMEOUT="0",
    )
    result = subprocess.run(
        [*pie_command(), "migrate"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert "cannot use the database" in result.stderr and "Traceback" not in result.stderr
