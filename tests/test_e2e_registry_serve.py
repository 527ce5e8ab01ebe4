"""End to end through a real ``pie serve`` process on the embedded database, with the
dispatcher running inside it: register a model with in-process handlers, activate a version,
run inference, and follow the job to its end over HTTP only."""

from __future__ import annotations

import time
import uuid

import httpx


def _poll_job(server, job_id: str, headers: dict[str, str], timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        r = httpx.get(f"{server.url}/v2/jobs/{job_id}", params={"wait": 5}, headers=headers, timeout=30)
        assert r.status_code == 200, r.text
        job = r.json()
        if job["status"] in ("success", "failure") or time.monotonic() > deadline:
            return job


def _model_with_active_version(server, inference: str) -> tuple[str, str]:
    api, manage = server.url, server.headers(scopes=["manage_models", "read_models"])
    model_id = f"e2e-{inference}-{uuid.uuid4().hex[:8]}"
    r = httpx.post(
        f"{api}/v2/models",
        json={
            "id": model_id,
            "name": "E2E echo",
            "description": "in-process handlers, no AWS",
            "handlers": {
                "training": {"type": "in_process", "value": "echo"},
                "inference": {"type": "in_process", "value": inference},
            },
            "handler_contracts": {"inference": {"input_schema": {"type": "object", "required": ["route"]}}},
        },
        headers=manage,
    )
    assert r.status_code == 201, r.text
    r = httpx.post(f"{api}/v2/models/{model_id}/new_version", json={"description": "first"}, headers=manage)
    assert r.status_code == 201, r.text
    version = r.json()["version"]["version"]
    r = httpx.post(
        f"{api}/v2/models/{model_id}/versions/{version}/new_status", json={"status": "active"}, headers=manage
    )
    assert r.status_code == 200, r.text
    assert r.json()["version"]["status"] == "active" and r.json()["model"]["status"] == "active"
    return model_id, version


def test_inference_runs_to_success_through_pie_serve(pie_server):
    api = pie_server.url
    r = httpx.get(f"{api}/v2/handlers/in-process", headers=pie_server.headers(scopes=["read_models"]))
    assert r.status_code == 200 and "echo" in r.json()

    model_id, version = _model_with_active_version(pie_server, "echo")
    runner = pie_server.headers(scopes=["run_inference"])
    # the input contract is checked before anything is queued
    r = httpx.post(
        f"{api}/v2/models/{model_id}/versions/{version}/inference", json={"input": {"day": 3}}, headers=runner
    )
    assert r.status_code == 422, r.text

    r = httpx.post(
        f"{api}/v2/models/{model_id}/versions/{version}/inference",
        json={"input": {"route": "Adelaide to Sydney", "day_of_week": 3}},
        headers=runner,
    )
    assert r.status_code == 202, r.text
    job_id = r.json()["inference_job_id"]

    job = _poll_job(pie_server, job_id, runner)
    assert job["status"] == "success", job
    assert job["output"] == {"input": {"route": "Adelaide to Sydney", "day_of_week": 3}, "features": None}
    assert job["model_id"] == model_id and job["model_version"] == version and job["attempts"] == 1
    assert job["started_at"] and job["completed_at"].endswith("Z") and job["error"] is None

    r = httpx.get(f"{api}/v2/jobs", params={"model_id": model_id}, headers=pie_server.headers(scopes=["read_models"]))
    assert r.status_code == 200 and [j["job_id"] for j in r.json()] == [job_id]


def test_failing_handler_ends_in_failure_with_a_structured_error(pie_server):
    model_id, version = _model_with_active_version(pie_server, "fail")
    reader = pie_server.headers(scopes=["run_inference", "read_models"])
    r = httpx.post(
        f"{pie_server.url}/v2/models/{model_id}/versions/{version}/inference",
        json={"input": {"route": "x"}},
        headers=reader,
    )
    assert r.status_code == 202, r.text
    job = _poll_job(pie_server, r.json()["inference_job_id"], reader)
    assert job["status"] == "failure" and job["output"] is None
    assert job["error"]["code"] == "deliberate_failure"
