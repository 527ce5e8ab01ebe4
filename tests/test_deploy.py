"""Deployment as a deployer does it (issue 7): a built wheel installed in a fresh virtual
environment serves from an unrelated directory against an empty external PostgreSQL (two
concurrent starts migrate once); `pie serve` migrates whatever database it serves;
`--workers 2` answers from two processes that both dispatch jobs; the docs work offline."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from html.parser import HTMLParser
from pathlib import Path

import httpx
import psycopg
import pytest
from conftest import clean_subprocess_env, free_port, pie_command

from pie.auth import mint_dev_token
from pie.config import Settings
from pie.db import libpq_url
from pie.migrate import current_revision, head_revision

ROOT = Path(__file__).resolve().parents[1]
SECRET = "deploy-test-secret"
START_TIMEOUT = 120.0


def admin_headers() -> dict[str, str]:
    settings = Settings(_env_file=None, jwt_secret=SECRET, jwt_issuer="pie-dev")
    return {"Authorization": "Bearer " + mint_dev_token(settings, admin=True)}


class Serve:
    """A `pie serve` subprocess started in ``cwd`` (not waited for)."""

    def __init__(self, command: list[str], cwd: Path, url: str, *args: str, **env: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = cwd / f"serve-{self.port}.log"
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [*command, "serve", "--host", "127.0.0.1", "--port", str(self.port), *args],
            env=clean_subprocess_env(
                PIE_DATABASE_URL=url,
                PIE_JWT_SECRET=SECRET,
                PIE_DATA_DIR=str(cwd / ".pie"),
                PIE_PUBLIC_URL=self.url,
                PIE_LOG_LEVEL="info",
                **env,
            ),
            cwd=cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, path: str = "/v2/health") -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                if httpx.get(f"{self.url}{path}", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"pie serve not ready (exit {self.process.poll()}):\n{self.log()[-4000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._log.close()


@pytest.fixture
def serves() -> Iterator[list[Serve]]:
    started: list[Serve] = []
    yield started
    for serve in started:
        serve.stop()


def tables(url: str) -> set[str]:
    with psycopg.connect(libpq_url(url)) as conn:
        return {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}


# --- pie serve migrates whatever database it serves --------------------------------------------


def test_serve_migrates_an_empty_external_database(scratch_url, tmp_path, serves):
    """Seen before: /v2/health was 200 while every API call was a 500 (relation does not exist)."""
    assert current_revision(scratch_url) == ""
    serves.append(serve := Serve(pie_command(), tmp_path, scratch_url))
    serve.wait_ready()
    assert current_revision(scratch_url) == head_revision() != ""
    r = httpx.post(f"{serve.url}/v2/clients", json={"client_id": "acme", "name": "Acme"}, headers=admin_headers())
    assert r.status_code == 201, r.text
    assert httpx.get(f"{serve.url}/v2/clients", headers=admin_headers()).json()[0]["client_id"] == "acme"
    assert "auth mode: development (HS256 tokens signed with PIE_JWT_SECRET)" in serve.log()


def test_serve_no_migrate_leaves_the_database_alone(scratch_url, tmp_path, serves):
    serves.append(serve := Serve(pie_command(), tmp_path, scratch_url, "--no-migrate"))
    serve.wait_ready("/v2/health/live")  # (health itself is 503 until the schema is migrated)
    assert httpx.get(f"{serve.url}/v2/health").status_code == 503
    assert "alembic_version" not in tables(scratch_url)
    assert "--no-migrate: the database is at revision '(empty)'" in serve.log()


# --- the wheel, installed elsewhere ------------------------------------------------------------


def build_wheel(dest: Path) -> Path:
    """Build the project's wheel from a copy of the source tree (no build files left behind)."""
    src = dest / "src-copy"
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pie", ".pytest_cache", ".hypothesis"
        ),
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dest / "dist"), str(src)],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    (wheel,) = (dest / "dist").glob("pie_server-*.whl")
    return wheel


def fresh_venv_with(wheel: Path, where: Path) -> Path:
    """A new virtual environment holding the wheel; its third-party dependencies are borrowed
    from the test environment by a .pth line (fast and offline) but every file of the
    package itself comes from the wheel. Returns its bin directory."""
    venv = where / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # appended after the venv's own site-packages; .pth files in it (the editable install of
    # the checkout) are not processed, so `pie` can only come from the wheel
    Path(purelib, "zz_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv / "bin"


def test_wheel_serves_from_any_directory_and_concurrent_starts_migrate_once(scratch_url, serves):
    work = Path(tempfile.mkdtemp(prefix="pie-wheel-"))
    try:
        wheel = build_wheel(work)
        bindir = fresh_venv_with(wheel, work)
        # the wheel carries its migrations
        import zipfile

        names = zipfile.ZipFile(wheel).namelist()
        assert "pie/py.typed" in names
        assert "pie/_migrations/env.py" in names and any(n.startswith("pie/_migrations/versions/0001") for n in names)
        unrelated = work / "somewhere-else"
        unrelated.mkdir()
        where = subprocess.run(
            [str(bindir / "python"), "-c", "import pie.migrate as m; print(m.__file__); print(m.migrations_dir())"],
            cwd=unrelated,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.split()
        assert all(p.startswith(str(work / "venv")) for p in where), where

        # two replicas started at once on the same empty database
        serves.append(a := Serve([str(bindir / "pie")], unrelated, scratch_url))
        serves.append(b := Serve([str(bindir / "pie")], unrelated, scratch_url))
        a.wait_ready()
        b.wait_ready()
        assert current_revision(scratch_url) == head_revision()
        ran = [s.log().count("Running upgrade") for s in (a, b)]
        assert sorted(ran) == [
            0,
            len(
                re.findall(
                    r"^revision",
                    "\n".join(p.read_text() for p in (ROOT / "migrations" / "versions").glob("*.py")),
                    re.M,
                )
            ),
        ], ran
        r = httpx.post(f"{a.url}/v2/clients", json={"client_id": "wheel", "name": "Wheel"}, headers=admin_headers())
        assert r.status_code == 201, r.text
        r = httpx.get(f"{b.url}/v2/clients/wheel", headers=admin_headers())
        assert r.status_code == 200 and r.json()["name"] == "Wheel", r.text
    finally:
        for serve in serves:
            serve.stop()
        shutil.rmtree(work, ignore_errors=True)


# --- several processes on one port -------------------------------------------------------------


def test_two_workers_answer_on_one_port_and_both_dispatch(scratch_url, tmp_path, serves):
    serves.append(
        serve := Serve(
            pie_command(),
            tmp_path,
            scratch_url,
            "--workers",
            "2",
            PIE_EXPOSE_WORKER_PID="true",
            PIE_RUN_DISPATCHER="true",
            PIE_DISPATCH_BATCH_SIZE="1",
            PIE_DISPATCH_POLL_INTERVAL="0.1",
        )
    )
    serve.wait_ready()

    def pid_of_answer(_: int) -> str:
        with httpx.Client() as c:  # a new connection each time
            r = c.get(f"{serve.url}/v2/health", timeout=10)
        assert r.status_code == 200
        return r.headers["x-pie-worker-pid"]

    pids: set[str] = set()
    with ThreadPoolExecutor(8) as pool:
        for _ in range(10):
            pids |= set(pool.map(pid_of_answer, range(40)))
            if len(pids) >= 2:
                break
    assert len(pids) == 2 and str(serve.process.pid) not in pids, pids

    # a model with an in-process handler, then jobs: both processes' dispatchers run some
    api, headers = serve.url, admin_headers()
    model = {
        "id": "echo",
        "name": "Echo",
        "description": "in-process echo",
        "handlers": {
            "training": {"type": "in_process", "value": "echo"},
            "inference": {"type": "in_process", "value": "echo"},
        },
    }
    r = httpx.post(f"{api}/v2/models", json=model, headers=headers)
    assert r.status_code == 201, r.text
    r = httpx.post(f"{api}/v2/models/echo/new_version", json={"description": "v"}, headers=headers)
    assert r.status_code == 201, r.text
    version = r.json()["version"]["version"]
    r = httpx.post(f"{api}/v2/models/echo/versions/{version}/new_status", json={"status": "active"}, headers=headers)
    assert r.status_code == 200, r.text

    def run_job(i: int) -> str:
        r = httpx.post(
            f"{api}/v2/models/echo/versions/{version}/inference", json={"input": {"i": i}}, headers=headers, timeout=30
        )
        assert r.status_code == 202, r.text
        return r.json()["inference_job_id"]

    with ThreadPoolExecutor(8) as pool:
        job_ids = list(pool.map(run_job, range(60)))
    deadline = time.monotonic() + 60
    with psycopg.connect(libpq_url(scratch_url)) as conn:
        while time.monotonic() < deadline:
            done = conn.execute(
                "SELECT count(*) FROM jobs WHERE job_id = ANY(%s) AND status = 'success'", (job_ids,)
            ).fetchone()[0]
            if done == len(job_ids):
                break
            time.sleep(0.2)
    assert done == len(job_ids)
    # each process stops its dispatcher gracefully and says how many jobs it handed over
    serve.stop()
    assert serve.process.returncode == 0, serve.log()[-3000:]
    counts = {
        pid: int(n)
        for pid, n in re.findall(r"dispatcher api@[^:]+:(\d+):[0-9a-f]+ stopped after (\d+) dispatches", serve.log())
    }
    assert set(counts) == pids, (counts, pids, serve.log()[-3000:])
    assert all(n > 0 for n in counts.values()) and sum(counts.values()) == len(job_ids), counts


# --- documentation without internet ------------------------------------------------------------


class _Assets(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href") and value:
                self.urls.append(value)


def referenced(html: str) -> list[str]:
    parser = _Assets()
    parser.feed(html)
    # Swagger UI's inline script names the OpenAPI document and the OAuth2 redirect too
    parser.urls += re.findall(r"(?:url|oauth2RedirectUrl|spec-url)['\"]?\s*[:=]\s*['\"]([^'\"]+)['\"]", html)
    return parser.urls


@pytest.mark.parametrize("page", ["/v2/docs", "/v2/redoc", "/"])
async def test_docs_reference_only_local_assets(client, page):
    r = await client.get(page)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    urls = referenced(r.text)
    assert urls, r.text
    for url in urls:
        assert url.startswith("/"), f"{page} references a remote asset: {url}"
        asset = await client.get(url)
        # the console link answers with its sign-in redirect (no session here)
        assert asset.status_code == (303 if url == "/console" else 200), url
    if page == "/v2/docs":
        assert any(u.endswith("swagger-ui-bundle.js") for u in urls)
    if page == "/v2/redoc":
        assert any(u.endswith("redoc.standalone.js") for u in urls)
    if page == "/":
        assert {"/console", "/v2/docs", "/v2/openapi.json", "/v2/health"} <= set(urls)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (apt-get install chromium)")
@pytest.mark.parametrize("page, rendered", [("/v2/docs", 'class="opblock'), ("/v2/redoc", "listclients")])
def test_docs_render_in_a_headless_browser_without_internet(pie_server, tmp_path, page, rendered):
    """Every host but 127.0.0.1 is unresolvable for the browser: the page must still render the
    operations (Swagger UI's opblocks, ReDoc's operation ids) from local assets only."""
    result = subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--user-data-dir={tmp_path}",
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            "--virtual-time-budget=15000",
            "--dump-dom",
            f"{pie_server.url}{page}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert rendered in result.stdout, result.stdout[-3000:]
    assert "/v2/clients" in result.stdout
