"""Issue 18, item 3 (spec 15.5): a signing key retired by ``pie keys retire`` signs no callback
token from the moment the command returns, in every process — with real processes: a running
``pie serve`` (its dispatcher) and a ``pie worker`` on one database, and the ``pie`` CLI.

The jobs run an in-process implementation from an installed distribution (an entry point on the
processes' PYTHONPATH) whose output is the ``callback_token`` it was handed, so the test reads
the key each token was signed with from the job's output.
"""

from __future__ import annotations

import subprocess
import textwrap
import time
import uuid
from pathlib import Path

import httpx
import pytest
from conftest import pie_command, scratch_pie_server
from jose import jwt

PLUGIN = textwrap.dedent(
    '''
    import os

    def token_echo(payload):
        """Output: the callback token this job was handed, and the process that ran it."""
        return {"callback_token": payload["callback_token"], "pid": os.getpid()}
    '''
)


@pytest.fixture
def plugin_path(tmp_path: Path) -> str:
    """A distribution providing the ``test_token_echo`` in-process implementation, as pip would
    install it (a module and its .dist-info with an entry point)."""
    (tmp_path / "pie_token_echo.py").write_text(PLUGIN)
    info = tmp_path / "pie_token_echo-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: pie-token-echo\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[pie.handlers]\ntest_token_echo = pie_token_echo:token_echo\n")
    return str(tmp_path)


def _wait_all(server, job_ids: list[str], headers: dict[str, str], timeout: float = 120.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    done: dict[str, dict] = {}
    while len(done) < len(job_ids):
        assert time.monotonic() < deadline, f"jobs not finished: {set(job_ids) - set(done)}"
        for job_id in job_ids:
            if job_id in done:
                continue
            r = httpx.get(f"{server.url}/v2/jobs/{job_id}", params={"wait": 5}, headers=headers, timeout=30)
            assert r.status_code == 200, r.text
            if r.json()["status"] in ("success", "failure"):
                done[job_id] = r.json()
    return [done[j] for j in job_ids]


def _kid(job: dict) -> str:
    assert job["status"] == "success", job
    return jwt.get_unverified_header(job["output"]["callback_token"])["kid"]


def test_a_retired_key_signs_nothing_once_the_command_returns(plugin_path, tmp_path):
    with scratch_pie_server(
        PYTHONPATH=plugin_path, PIE_RUN_DISPATCHER="true", PIE_DISPATCH_POLL_INTERVAL="0.2"
    ) as server:
        worker_log = open(tmp_path / "worker.log", "w")
        worker = subprocess.Popen(
            [*pie_command(), "worker"],
            env=server.env,
            cwd=server.data_dir,
            stdout=worker_log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        try:
            admin = server.admin_headers
            model_id = f"keys-{uuid.uuid4().hex[:8]}"
            handler = {"type": "in_process", "value": "test_token_echo"}
            r = httpx.post(
                f"{server.url}/v2/models",
                json={
                    "id": model_id,
                    "name": model_id,
                    "description": "",
                    "handlers": {"training": handler, "inference": handler},
                },
                headers=admin,
            )
            assert r.status_code == 201, r.text
            assert httpx.post(f"{server.url}/v2/models/{model_id}/new_version", json={"version": "1"}, headers=admin)
            r = httpx.post(
                f"{server.url}/v2/models/{model_id}/versions/1/new_status", json={"status": "active"}, headers=admin
            )
            assert r.status_code == 200, r.text
            infer = f"{server.url}/v2/models/{model_id}/versions/1/inference"

            def launch(n: int) -> list[str]:
                ids = []
                for i in range(n):
                    r = httpx.post(infer, json={"input": {"i": i}}, headers=admin, timeout=30)
                    assert r.status_code == 202, r.text
                    ids.append(r.json()["inference_job_id"])
                return ids

            def batches_from_both_processes() -> list[dict]:
                """Jobs in batches until each of the two dispatching processes ran some."""
                jobs: list[dict] = []
                deadline = time.monotonic() + 120
                while len({job["output"]["pid"] for job in jobs}) < 2:
                    assert time.monotonic() < deadline, "one of the two processes never dispatched"
                    jobs += _wait_all(server, launch(8), admin)
                return jobs

            # both processes have signed (and, before the fix, cached) the first key
            before = batches_from_both_processes()
            (old,) = {_kid(job) for job in before}

            rotated = server.cli("keys", "rotate")
            assert rotated.returncode == 0, rotated.stderr
            retired = server.cli("keys", "retire", old)
            assert retired.returncode == 0, retired.stderr
            # the command has returned: every job dispatched from now on, by either process,
            # carries a token of the new key
            after = batches_from_both_processes()
            kids = {_kid(job) for job in after}
            assert old not in kids, f"tokens signed with the retired key {old} after `pie keys retire` returned"
            listed = {line.split()[0]: line for line in server.cli("keys", "list").stdout.splitlines()}
            assert "retired" in listed[old]
            assert kids == {rotated.stdout.split()[3].rstrip(":")}

            def complete(job: dict) -> httpx.Response:
                url = f"{server.url}/v2/models/{model_id}/versions/1/jobs/{job['job_id']}/complete"
                token = job["output"]["callback_token"]
                body = {"status": "success", "output": job["output"]}
                return httpx.post(url, json=body, headers={"Authorization": f"Bearer {token}"}, timeout=30)

            # the new tokens are live (a repeated completion is the documented no-op), the old dead
            assert complete(after[-1]).status_code == 200
            r = complete(before[-1])
            assert r.status_code == 401 and "retired" in r.json()["message"]
        finally:
            worker.terminate()
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
            worker_log.close()
        log = (tmp_path / "worker.log").read_text()
        assert "dispatching" in log, log
