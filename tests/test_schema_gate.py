"""`pie serve --no-migrate` on a database that is not migrated (issue 18, item 10): health says
so (503 with the reason), API requests answer the 503 envelope instead of 500s, the dispatcher
waits quietly; once `pie migrate` has run, everything works without a restart."""

from __future__ import annotations

import subprocess
import time

import httpx
from conftest import clean_subprocess_env, pie_command
from test_deploy import Serve, admin_headers, serves  # noqa: F401  (the fixture)
from test_operations_serve import json_lines


def wait_until(predicate, timeout: float = 60.0, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(interval)


def test_an_unmigrated_database_is_a_503_with_the_reason_until_it_is_migrated(scratch_url, tmp_path, serves):
    serves.append(
        serve := Serve(
            pie_command(),
            tmp_path,
            scratch_url,
            "--no-migrate",
            PIE_LOG_FORMAT="json",
            PIE_RUN_DISPATCHER="true",
            PIE_DISPATCH_POLL_INTERVAL="0.2",
        )
    )
    wait_until(lambda: serve.process.poll() is not None or _answers(serve.url + "/v2/health/live"))
    assert serve.process.poll() is None, serve.log()[-3000:]

    r = httpx.get(serve.url + "/v2/health")
    assert r.status_code == 503, r.text  # was 200 while every API call was a 500
    assert r.json()["status"] == "degraded" and "schema not migrated" in r.json()["reason"]
    assert "pie migrate" in r.json()["reason"]
    for method, path, body in [
        ("GET", "/v2/clients", None),
        ("POST", "/v2/clients", {"client_id": "acme", "name": "Acme"}),
        ("GET", "/v2/jobs/0190a4c2-0000-7000-8000-000000000000", None),
        ("POST", "/v2/models/m/versions/1/inference", {"input": {}}),
    ]:
        r = httpx.request(method, serve.url + path, json=body, headers=admin_headers())
        assert r.status_code == 503, (path, r.status_code, r.text)
        assert r.json()["success"] is False and "database schema not migrated" in r.json()["message"]
        assert r.headers["retry-after"]
    # what needs no schema still answers
    assert httpx.get(serve.url + "/v2/health/live").status_code == 200
    assert httpx.get(serve.url + "/v2/openapi.json").status_code == 200
    assert httpx.get(serve.url + "/v2/health/ready").status_code == 503

    # the dispatcher says once that it waits, and nothing logs a traceback
    wait_until(lambda: any("dispatching waits" in line.get("message", "") for line in json_lines(serve.log())))
    time.sleep(6)  # a few more dispatch cycles (poll interval 0.2 s): still one line
    lines = json_lines(serve.log())
    assert "Traceback" not in serve.log()
    assert not any(line.get("exc_info") for line in lines), [line for line in lines if line.get("exc_info")][:2]
    waiting = [line for line in lines if "dispatching waits" in line.get("message", "")]
    assert len(waiting) == 1, waiting
    assert not [line for line in lines if line["level"] == "ERROR"]

    # migrated behind the server's back: it serves, and dispatches, without a restart
    migrated = subprocess.run(
        [*pie_command(), "migrate"],
        env=clean_subprocess_env(PIE_DATABASE_URL=scratch_url, PIE_DATA_DIR=str(tmp_path / ".pie")),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert migrated.returncode == 0, migrated.stderr
    wait_until(lambda: httpx.get(serve.url + "/v2/health").status_code == 200)
    headers = admin_headers()
    handlers = {kind: {"type": "in_process", "value": "echo"} for kind in ("training", "inference")}
    for path, body in [
        ("/v2/models", {"id": "m", "name": "m", "description": "m", "handlers": handlers}),
        ("/v2/models/m/new_version", {"version": "1"}),
        ("/v2/models/m/versions/1/new_status", {"status": "active"}),
    ]:
        r = httpx.post(serve.url + path, json=body, headers=headers)
        assert r.status_code < 300, (path, r.status_code, r.text)
    r = httpx.post(serve.url + "/v2/models/m/versions/1/inference", json={"input": {"x": 1}}, headers=headers)
    assert r.status_code == 202, r.text
    job_url = f"{serve.url}/v2/jobs/{r.json()['inference_job_id']}"
    wait_until(lambda: httpx.get(job_url, headers=headers).json()["status"] == "success")


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
