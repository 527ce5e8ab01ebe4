"""pie_handler_kit on its own (standard library only): payload parsing, the report body and
token, retries of transient callback failures with backoff, final answers not retried, the
stdlib output-contract subset, and the ECS entrypoint's exit status."""

from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kit"))
import pie_handler_kit as kit


class Callback:
    """A tiny HTTP server answering the kit's reports with scripted statuses."""

    def __init__(self, answers):
        self.answers = list(answers)
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                status, extra, *answer = outer.answers.pop(0) if outer.answers else (200, {})
                data = json.dumps(
                    answer[0] if answer else {"status": body["status"], "message": f"answer {status}"}
                ).encode()
                self.send_response(status)
                for k, v in extra.items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def callback():
    servers = []

    def make(*answers):
        servers.append(Callback(answers))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def payload(url, **extra):
    return {
        "job_id": "j1",
        "job_type": "inference",
        "model_id": "m",
        "model_version": "1",
        "assignment_id": None,
        "client_id": "c1",
        "domain_id": None,
        "service_id": None,
        "input": {"a": 1},
        "features": {"f": 2},
        "callback_url": f"{url}/v2/models/m/versions/1/jobs/j1/complete",
        "callback_token": "tok.en.sig",
        **extra,
    }


def test_success_is_reported_with_the_callback_token(callback):
    cb = callback()
    seen = []

    def fn(input, features, job):
        seen.append((input, features, job.job_id, job.client_id, job.model_version))
        return {"sum": input["a"] + features["f"]}

    result = kit.run(fn, json.dumps(payload(cb.url)))  # also parses JSON text (ECS)
    assert seen == [({"a": 1}, {"f": 2}, "j1", "c1", "1")]
    assert result["status"] == "success" and result["callback"]["status"] == "success"
    assert cb.requests == [
        {
            "path": "/v2/models/m/versions/1/jobs/j1/complete",
            "auth": "Bearer tok.en.sig",
            "body": {"status": "success", "output": {"sum": 3}},
        }
    ]


def test_failures_are_structured_errors(callback):
    cb = callback()

    def refuse(input, features, job):
        raise kit.HandlerError("bad_input", "no", {"field": "a"})

    def crash(input, features, job):
        raise ZeroDivisionError("division by zero")

    kit.run(refuse, payload(cb.url))
    kit.run(crash, payload(cb.url))
    kit.run(lambda i, f, j: {"x": float("nan")}, payload(cb.url))
    errors = [r["body"]["error"] for r in cb.requests]
    assert errors[0] == {"code": "bad_input", "message": "no", "details": {"field": "a"}}
    assert errors[1] == {"code": "handler_exception", "message": "division by zero", "exception": "ZeroDivisionError"}
    assert errors[2]["code"] == "invalid_output"
    assert all(r["body"]["status"] == "failure" for r in cb.requests)


def test_transient_failures_are_retried_with_backoff(callback):
    cb = callback((503, {}), (429, {"Retry-After": "0.01"}), (500, {}))
    sleeps = []
    result = kit.run(lambda i, f, j: 1, payload(cb.url), sleep=sleeps.append, backoff=0.1)
    assert result["status"] == "success" and len(cb.requests) == 4
    assert sleeps[1] == 0.01  # Retry-After honoured
    assert 0.05 <= sleeps[0] <= 0.1 and 0.2 <= sleeps[2] <= 0.4  # exponential, with jitter


def test_final_answers_are_not_retried(callback):
    cb = callback((401, {}))
    with pytest.raises(kit.CallbackError) as caught:
        kit.run(lambda i, f, j: 1, payload(cb.url), sleep=lambda s: None)
    assert caught.value.status == 401 and len(cb.requests) == 1 and "answer 401" in str(caught.value)


def test_unreachable_pie_gives_up_after_the_attempts(callback):
    cb = callback()
    url = cb.url
    cb.close()
    sleeps = []
    with pytest.raises(kit.CallbackError) as caught:
        kit.run(lambda i, f, j: 1, payload(url), sleep=sleeps.append, attempts=3, timeout=2)
    assert caught.value.status is None and len(sleeps) == 2


def test_not_a_payload():
    for bad in ("not json", "[1]", {"job_id": "x"}):
        with pytest.raises(kit.PayloadError):
            kit.parse_payload(bad)


SCHEMA = {
    "type": "object",
    "required": ["price"],
    "additionalProperties": False,
    "properties": {
        "price": {"type": "number", "minimum": 0},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 2},
        "kind": {"enum": ["a", "b"]},
    },
}


@pytest.mark.parametrize(
    "output, problem",
    [
        ({"price": 1, "tags": ["x"], "kind": "a"}, None),
        ({"tags": []}, "'price' is required"),
        ({"price": -1}, "minimum"),
        ({"price": True}, "expected number"),
        ({"price": 1, "extra": 1}, "unexpected property"),
        ({"price": 1, "tags": ["x", 2]}, "tags[1]"),
        ({"price": 1, "tags": ["x", "y", "z"]}, "more than 2"),
        ({"price": 1, "kind": "c"}, "one of"),
    ],
)
def test_stdlib_contract_subset(output, problem):
    found = kit._subset_error(SCHEMA, output, "")
    assert (found is None) if problem is None else (problem in found), found


def test_output_contract_violation_fails_the_job(callback):
    cb = callback()
    kit.run(lambda i, f, j: {"price": "free"}, payload(cb.url), output_schema=SCHEMA)
    (request,) = cb.requests
    assert request["body"]["status"] == "failure" and request["body"]["error"]["code"] == "output_contract_violation"
    assert "price" in request["body"]["error"]["message"]


def test_ecs_main_exit_status(callback):
    cb = callback((409, {}))
    assert kit.main(lambda i, f, j: 1, environ={}) == 2
    assert kit.main(lambda i, f, j: 1, environ={"PIE_JOB_PAYLOAD": "{"}) == 2
    assert (
        kit.main(lambda i, f, j: 1, environ={"PIE_JOB_PAYLOAD": json.dumps(payload(cb.url))}) == 1
    )  # 409: not delivered
    assert kit.main(lambda i, f, j: 1, environ={"PIE_JOB_PAYLOAD": json.dumps(payload(cb.url))}) == 0


def test_a_report_of_a_cancelled_job_ends_as_cancelled(callback):
    """PIE answers any report of a job it cancelled with 409 `cancelled: true`: the job's end,
    not an error (a Lambda handler raising would make Lambda retry the event)."""
    cancelled = {"success": False, "message": "job j1 was cancelled", "cancelled": True}
    cb = callback((409, {}, cancelled), (409, {}, cancelled), (409, {}, {"success": False, "message": "ended"}))
    handler = kit.lambda_handler(lambda i, f, j: {"price": 1})
    result = handler(payload(cb.url), None)
    assert result["status"] == "cancelled" and result["error"] is None and result["callback"] == cancelled
    assert kit.main(lambda i, f, j: 1, environ={"PIE_JOB_PAYLOAD": json.dumps(payload(cb.url))}) == 0
    with pytest.raises(kit.CallbackError):  # any other 409 is still final and an error
        kit.run(lambda i, f, j: 1, payload(cb.url))
    assert len(cb.requests) == 3


def test_sigterm_asks_the_handler_to_stop_while_main_runs(callback):
    import os
    import signal

    cb = callback()
    before = signal.getsignal(signal.SIGTERM)
    seen = []

    def long(input, features, job):
        seen.append(job.cancelled())
        os.kill(os.getpid(), signal.SIGTERM)  # what ECS sends on StopTask
        for _ in range(500):
            if job.cancelled():
                seen.append(True)
                raise kit.JobCancelled()
            threading.Event().wait(0.01)
        return {"finished": True}

    try:
        assert kit.main(long, environ={"PIE_JOB_PAYLOAD": json.dumps(payload(cb.url))}) == 0
        assert seen == [False, True]
        [request] = cb.requests
        assert request["body"]["status"] == "failure" and request["body"]["error"]["code"] == "interrupted"
        assert signal.getsignal(signal.SIGTERM) is before  # restored
    finally:
        kit._stop_requested.clear()
    assert kit.cancelled() is False  # outside a task or a PIE in-process job
