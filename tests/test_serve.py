"""`pie serve` as a real subprocess on the embedded PostgreSQL (the README's local mode)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import httpx

from conftest import clean_subprocess_env, start_pie_server


def test_health_and_openapi(pie_server):
    r = httpx.get(f"{pie_server.url}/v2/health")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "database": "ok"}
    assert r.headers["x-request-id"]
    r = httpx.get(f"{pie_server.url}/v2/openapi.json")
    assert r.status_code == 200
    assert "listclients" in r.text


def test_cli_token_lists_clients(pie_server):
    result = pie_server.cli("token", "--admin")
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    r = httpx.get(f"{pie_server.url}/v2/clients", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200, r.text
    assert r.json() == []


def test_writes_persist_and_auth_is_enforced(pie_server):
    r = httpx.get(f"{pie_server.url}/v2/clients")
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    client_id = "serve-e2e"
    r = httpx.post(
        f"{pie_server.url}/v2/clients", json={"client_id": client_id, "name": "Serve"}, headers=pie_server.admin_headers
    )
    assert r.status_code == 201, r.text
    # a tenant-scoped machine token sees exactly its own client
    r = httpx.get(f"{pie_server.url}/v2/clients", headers=pie_server.headers(scopes=["read_domains"], client_id=client_id))
    assert r.status_code == 200 and [c["client_id"] for c in r.json()] == [client_id]


def test_zero_config_local_mode_serve_and_token_agree():
    """No PIE_JWT_SECRET: `pie serve` and `pie token` with the same PIE_DATA_DIR share the
    secret persisted under it."""
    data_dir = Path(tempfile.mkdtemp(prefix="pie-zero-config-"))
    server = start_pie_server(data_dir, env=clean_subprocess_env(PIE_RUN_DISPATCHER="false"))
    try:
        assert "PIE_JWT_SECRET" not in server.env
        result = server.cli("token", "--admin")
        assert result.returncode == 0, result.stderr
        headers = {"Authorization": f"Bearer {result.stdout.strip()}"}
        r = httpx.get(f"{server.url}/v2/clients", headers=headers)
        assert r.status_code == 200, r.text
        assert r.json() == []
        # the secret lives under PIE_DATA_DIR, readable by its owner only
        secret_file = data_dir / "dev-jwt-secret"
        assert secret_file.stat().st_mode & 0o777 == 0o600
        # a token signed with another secret is refused
        r = httpx.get(f"{server.url}/v2/clients", headers=pie_server_headers("another-secret"))
        assert r.status_code == 401
        # stopping is graceful and takes the embedded PostgreSQL down with it
        server.stop()
        assert server.process.returncode == 0, server.log()[-2000:]
        assert not (data_dir / "pgdata" / "postmaster.pid").exists()
    finally:
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def pie_server_headers(secret: str) -> dict[str, str]:
    from pie.auth import mint_dev_token
    from pie.config import Settings

    return {"Authorization": "Bearer " + mint_dev_token(Settings(_env_file=None, jwt_secret=secret), admin=True)}
