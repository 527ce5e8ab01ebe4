"""The Dockerfile and docker-compose.yml as an operator runs them (issue 18, item 13). No Docker
daemon runs here: the files are parsed and their rules checked, and the image's commands are run
directly, with the environment a container would get (the image's ENV, then compose's env_file and
environment), the way the image runs them."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import SUBPROCESS_POOLS, clean_subprocess_env, free_port

from pie.config import Settings

ROOT = Path(__file__).resolve().parents[1]
PIE_SERVICES = ("migrate", "api", "worker")


# --- parsing ------------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, rest = line.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, rest in dockerfile_instructions():
        if keyword == "ENV":
            for token in shlex.split(rest):
                key, _, value = token.partition("=")
                env[key] = value
    return env


def exec_form(keyword: str) -> list[str]:
    """The exec-form (JSON array) command of the Dockerfile's last CMD or HEALTHCHECK."""
    found = [rest for kw, rest in dockerfile_instructions() if kw == keyword]
    assert found, f"no {keyword}"
    text = found[-1]
    if keyword == "HEALTHCHECK":
        assert " CMD " in f" {text} ", text
        text = text.split("CMD", 1)[1].strip()
    command = json.loads(text)  # exec form: no shell, signals reach the process
    assert isinstance(command, list) and all(isinstance(a, str) for a in command)
    return command


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def dotenv_file(path: Path) -> dict[str, str]:
    from dotenv import dotenv_values

    return {k: v or "" for k, v in dotenv_values(path).items()}


_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def interpolate(value: str, variables: Mapping[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error} (from the .env file)."""

    def replace(match: re.Match[str]) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3) or ""
        current = variables.get(name)
        if op == ":-":
            return current if current else arg
        if op == "-":
            return current if current is not None else arg
        if op == ":?":
            assert current, f"compose requires {name}: {arg}"
            return current
        return current or ""

    return _VARIABLE.sub(replace, value)


def container_env(service: str, dotenv: Mapping[str, str]) -> dict[str, str]:
    """What a container of ``service`` sees: the image's ENV, the env_file, then `environment`."""
    spec = compose()["services"][service]
    env = image_env()
    env_files = spec.get("env_file")
    assert env_files, f"{service} reads no env_file"
    env.update(dotenv)
    env.update({k: interpolate(str(v), dotenv) for k, v in (spec.get("environment") or {}).items()})
    return env


def seconds(duration: str) -> float:
    total = 0.0
    for amount, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration):
        total += float(amount) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    return total


# --- the rules ------------------------------------------------------------------------------------


def test_the_image_command_takes_its_settings_from_the_environment():
    """`-e PIE_PORT=9000` works: CMD has no --host/--port flags; the image's ENV has the
    container defaults."""
    assert exec_form("CMD") == ["pie", "serve"]
    env = image_env()
    assert env["PIE_HOST"] == "0.0.0.0" and env["PIE_PORT"] == "8000"
    assert "PIE_PUBLIC_URL" not in env  # no loopback default baked in: the operator's to set


def test_the_base_image_is_pinned_by_digest():
    (base,) = [rest for kw, rest in dockerfile_instructions() if kw == "FROM"]
    assert re.fullmatch(r"python:3\.11-slim@sha256:[0-9a-f]{64}", base), base


def test_the_health_check_follows_the_port_and_is_off_for_commands_without_http():
    check = exec_form("HEALTHCHECK")
    assert check == ["python", "-m", "pie.healthcheck"]
    assert "8000" not in " ".join(check)
    services = compose()["services"]
    for name in ("migrate", "worker"):
        assert services[name]["healthcheck"] == {"disable": True}, name
    assert "healthcheck" not in services["api"] or "disable" not in services["api"]["healthcheck"]


def test_compose_reads_an_env_file_instead_of_a_fixed_list():
    services = compose()["services"]
    for name in PIE_SERVICES:
        env_file = services[name]["env_file"]
        assert env_file == ".env" or ".env" in env_file, name
        # only what a container needs to differ from a local run is pinned here
        assert set(services[name].get("environment") or {}) <= {"PIE_DATABASE_URL", "PIE_HOST", "PIE_DATA_DIR"}, name
    # PIE_DATABASE_URL defaults to the postgres service, and .env can point elsewhere
    pg = services["postgres"]["environment"]
    default = f"postgresql://{pg['POSTGRES_USER']}:{pg['POSTGRES_PASSWORD']}@postgres:5432/{pg['POSTGRES_DB']}"
    assert container_env("api", {})["PIE_DATABASE_URL"] == default
    assert container_env("api", {"PIE_DATABASE_URL": "postgresql://x@db/y"})["PIE_DATABASE_URL"] == (
        "postgresql://x@db/y"
    )
    # the published port follows PIE_PORT, inside and out
    assert services["api"]["ports"] == ["${PIE_PORT:-8000}:${PIE_PORT:-8000}"]


def test_compose_leaves_pie_public_url_to_the_operator():
    """A fixed loopback PIE_PUBLIC_URL made every Lambda/ECS callback unreachable."""
    for name in PIE_SERVICES:
        env = container_env(name, {"PIE_PUBLIC_URL": "https://pie.example.com"})
        assert env["PIE_PUBLIC_URL"] == "https://pie.example.com", name
        assert "PIE_PUBLIC_URL" not in container_env(name, {}), name


def test_containers_get_longer_to_stop_than_pie_takes():
    services = compose()["services"]
    grace = max(
        Settings(_env_file=None).shutdown_grace_seconds,
        float(dotenv_file(ROOT / ".env.example")["PIE_SHUTDOWN_GRACE_SECONDS"]),
    )
    for name in ("api", "worker"):
        assert seconds(services[name]["stop_grace_period"]) >= grace + 5, name
    assert ("STOPSIGNAL", "SIGTERM") in dockerfile_instructions()


def test_one_image_built_once_and_the_worker_needs_only_the_database():
    services = compose()["services"]
    builders = [name for name in services if "build" in services[name]]
    assert builders == ["migrate"], builders  # everything else starts after it
    images = {services[name]["image"] for name in PIE_SERVICES}
    assert len(images) == 1, images
    worker = services["worker"]["depends_on"]
    assert "api" not in worker and worker["migrate"] == {"condition": "service_completed_successfully"}
    assert services["api"]["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}


# --- the image's commands, run as the image runs them ---------------------------------------------


class Container:
    """A process started as a container of ``service`` would start it (its command and
    environment); what cannot be the same here is replaced (the database, the data directory,
    the port, and 0.0.0.0 by 127.0.0.1: servers the tests start bind loopback only)."""

    def __init__(self, service: str, command: list[str], env: dict[str, str], cwd: Path):
        self.env = env
        self.log_path = cwd / f"{service}-{env.get('PIE_PORT', 'x')}.log"
        self._log = open(self.log_path, "w")
        bin_dir = Path(sys.executable).parent
        self.process = subprocess.Popen(
            [str(bin_dir / command[0]) if (bin_dir / command[0]).exists() else command[0], *command[1:]],
            env=env,
            cwd=cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int | None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._log.close()
        return self.process.returncode


def health_check(env: dict[str, str], pid: int) -> subprocess.CompletedProcess[str]:
    """The image's HEALTHCHECK command in the container's environment; ``--pid``: the process
    that is the container's command here (PID 1 in a container)."""
    command = exec_form("HEALTHCHECK")
    assert command[0] == "python"
    return subprocess.run(
        [sys.executable, *command[1:], "--pid", str(pid)], env=env, capture_output=True, text=True, timeout=30
    )


@pytest.fixture
def containers() -> Iterator[list[Container]]:
    started: list[Container] = []
    yield started
    for container in started:
        container.stop()


def local(env: dict[str, str], database_url: str, data_dir: Path, **extra: str) -> dict[str, str]:
    env = {**clean_subprocess_env(), **env, "PIE_DATABASE_URL": database_url, "PIE_DATA_DIR": str(data_dir)}
    env.update(SUBPROCESS_POOLS)  # the shared test PostgreSQL is busy: small pools
    if env.get("PIE_HOST") == "0.0.0.0":
        env["PIE_HOST"] = "127.0.0.1"
    env.update(extra)
    return env


def wait_ready(container: Container, port: int) -> None:
    deadline = time.monotonic() + 120
    while True:
        assert container.process.poll() is None, container.log()[-3000:]
        assert time.monotonic() < deadline, container.log()[-3000:]
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)


def test_the_example_env_file_alone_does_not_serve_development_auth_on_all_interfaces(tmp_path):
    """The image's CMD with .env.example as the env file (no Cognito, no secret) on the image's
    0.0.0.0: exit 2 naming the opt-in, before anything binds or connects."""
    dotenv = dotenv_file(ROOT / ".env.example")
    env = {**clean_subprocess_env(), **container_env("api", dotenv), "PIE_DATA_DIR": str(tmp_path / "data")}
    env["PIE_DATABASE_URL"] = f"postgresql://postgres@127.0.0.1:{free_port()}/nope"  # (never reached)
    env["PIE_DB_STARTUP_TIMEOUT"] = "1"
    assert env["PIE_HOST"] == "0.0.0.0"
    result = subprocess.run(
        [str(Path(sys.executable).parent / "pie"), *exec_form("CMD")[1:]],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "PIE_AUTH_MODE=development" in result.stderr.strip().splitlines()[-1]


def test_the_compose_services_and_the_image_command_run_as_the_image_runs_them(scratch_url, tmp_path, containers):
    # the operator's .env: the example with a secret and a public URL set
    dotenv = {**dotenv_file(ROOT / ".env.example"), "PIE_JWT_SECRET": "compose-secret"}
    dotenv["PIE_PUBLIC_URL"] = "https://pie.example.com"
    services = compose()["services"]
    data_dir = tmp_path / "pie-data"

    # migrate: one-shot, exits 0
    migrate_env = local(container_env("migrate", dotenv), scratch_url, data_dir)
    migrated = subprocess.run(
        [str(Path(sys.executable).parent / "pie"), *services["migrate"]["command"][1:]],
        env=migrate_env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert migrated.returncode == 0, migrated.stderr

    # api: compose's command, the port from PIE_PORT; the image's health check passes, and
    # follows PIE_PORT (a check on another port fails)
    port = free_port()
    api_env = local(container_env("api", {**dotenv, "PIE_PORT": str(port)}), scratch_url, data_dir)
    containers.append(api := Container("api", services["api"]["command"], api_env, tmp_path))
    wait_ready(api, port)
    assert health_check(api_env, api.process.pid).returncode == 0
    elsewhere = health_check({**api_env, "PIE_PORT": str(free_port())}, api.process.pid)
    assert elsewhere.returncode == 1, elsewhere.stdout

    # worker: the same image and env file; its health check passes without probing
    worker_env = local(container_env("worker", dotenv), scratch_url, data_dir)
    containers.append(worker := Container("worker", services["worker"]["command"], worker_env, tmp_path))
    deadline = time.monotonic() + 60
    while "dispatching" not in worker.log():
        assert worker.process.poll() is None and time.monotonic() < deadline, worker.log()[-3000:]
        time.sleep(0.2)
    check = health_check({**worker_env, "PIE_PORT": str(free_port())}, worker.process.pid)
    assert check.returncode == 0 and "serves no HTTP" in check.stdout, check.stdout

    # the image's own CMD (no flags): PIE_PORT from the environment decides the port
    port = free_port()
    image_env_ = local(container_env("api", {**dotenv, "PIE_PORT": str(port)}), scratch_url, data_dir)
    containers.append(served := Container("image", exec_form("CMD"), image_env_, tmp_path))
    wait_ready(served, port)
    assert health_check(image_env_, served.process.pid).returncode == 0
    for container in containers:
        assert container.stop() == 0, container.log()[-2000:]
    assert "Traceback" not in "".join(c.log() for c in containers)
