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


# --- deployment files agree with the code -----------------------------------------------------

import re  # noqa: E402

import yaml  # noqa: E402
from pydantic import AliasChoices  # noqa: E402

from pie.config import Settings  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
AWS_CREDENTIALS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}


def setting_env_names() -> dict[str, set[str]]:
    """field -> the environment variable names that set it."""
    names: dict[str, set[str]] = {}
    for field_name, info in Settings.model_fields.items():
        alias = info.validation_alias
        names[field_name] = set(alias.choices) if isinstance(alias, AliasChoices) else {f"PIE_{field_name.upper()}"}
    return names


def env_example() -> dict[str, str]:
    pairs = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


def test_env_example_lists_every_setting_with_a_comment():
    listed = env_example()
    for field_name, names in setting_env_names().items():
        assert names & set(listed), f"setting {field_name} ({' or '.join(sorted(names))}) missing from .env.example"
    known = set().union(*setting_env_names().values())
    assert set(listed) <= known, f"unknown variables in .env.example: {set(listed) - known}"
    # every variable is preceded by a comment line somewhere above it in its block
    text = (ROOT / ".env.example").read_text()
    for key in listed:
        block = text.split(f"\n{key}=")[0].rsplit("\n\n", 1)[-1]
        assert "#" in block, f"{key} has no comment"


def test_env_example_as_dotenv_means_the_defaults(tmp_path, monkeypatch):
    for names in setting_env_names().values():
        for name in names:
            monkeypatch.delenv(name, raising=False)
    (tmp_path / ".env").write_text((ROOT / ".env.example").read_text())
    monkeypatch.chdir(tmp_path)
    assert Settings() == Settings(_env_file=None)


def test_docker_compose_is_consistent_with_the_code():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "api", "worker"} <= set(services)
    assert services["postgres"]["image"].startswith("postgres:16")
    assert services["api"]["command"][:2] == ["pie", "serve"] and "0.0.0.0" in services["api"]["command"]
    assert services["worker"]["command"] == ["pie", "worker"]
    known = set().union(*setting_env_names().values()) | AWS_CREDENTIALS
    for name in ("api", "worker"):
        env = services[name]["environment"]
        assert set(env) <= known, f"{name}: unknown variables {set(env) - known}"
        url = env["PIE_DATABASE_URL"]
        assert url.startswith("postgresql://") and "@postgres:5432/" in url
        pg = services["postgres"]["environment"]
        assert url == f"postgresql://{pg['POSTGRES_USER']}:{pg['POSTGRES_PASSWORD']}@postgres:5432/{pg['POSTGRES_DB']}"
    # the API's dispatcher is optional (the worker dispatches)
    assert services["api"]["environment"]["PIE_RUN_DISPATCHER"].endswith(":-false}")
    assert "PIE_RUN_DISPATCHER" not in services["worker"]["environment"]


def test_dockerfile_runs_pie_serve_as_non_root():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim", text, re.M)
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    assert 'CMD ["pie", "serve", "--host", "0.0.0.0"' in text
    assert "COPY migrations" in text and "pip install ." in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", ".env", ".pie"} <= set(ignored)
