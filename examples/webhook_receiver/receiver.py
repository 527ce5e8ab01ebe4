"""A PIE webhook receiver that verifies every delivery with the ``standardwebhooks`` package.

    pip install standardwebhooks
    WEBHOOK_SECRET=whsec_... python examples/webhook_receiver/receiver.py --port 8080

It answers 204 to a delivery whose signature verifies (and 400 otherwise, so PIE retries a
delivery that a proxy mangled), acts on each event once even though PIE may deliver it more than
once (at-least-once: the ``webhook-id`` is the same on every retry), and prints what arrived.
During a secret rotation PIE signs with both secrets for 24 hours: set ``WEBHOOK_SECRET`` to the
new secret (and ``WEBHOOK_PREVIOUS_SECRET`` to the old one while you roll the change out).

Put it behind an https reverse proxy for a real deployment (PIE only sends to https URLs with
public addresses unless PIE_WEBHOOKS_ALLOW_HTTP / PIE_WEBHOOKS_ALLOW_PRIVATE are set).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from collections import OrderedDict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks import Webhook, WebhookVerificationError

MAX_BODY = 1024 * 1024  # PIE never sends more than a job object (outputs over 64 KiB are left out)


class Seen:
    """The webhook-ids already handled (bounded): a retried delivery is acknowledged, not redone."""

    def __init__(self, size: int = 100_000):
        self.size = size
        self.ids: OrderedDict[str, None] = OrderedDict()
        self.lock = threading.Lock()

    def first_time(self, webhook_id: str) -> bool:
        with self.lock:
            if webhook_id in self.ids:
                return False
            self.ids[webhook_id] = None
            if len(self.ids) > self.size:
                self.ids.popitem(last=False)
            return True


def verify(verifiers: list[Webhook], body: bytes, headers: dict[str, str]) -> dict[str, Any]:
    """The event, once a signature verifies with one of the secrets (else WebhookVerificationError)."""
    error: WebhookVerificationError | None = None
    for verifier in verifiers:
        try:
            return verifier.verify(body, headers)
        except WebhookVerificationError as exc:
            error = exc
    assert error is not None
    raise error


def handle(event: dict[str, Any]) -> None:
    """Your integration goes here: e.g. read the price recommendation of a finished job."""
    data = event["data"]
    if event["type"] == "job.succeeded":
        output = data.get("output") if "output" in data else "(over 64 KiB: GET /v2/jobs/{job_id})"
        print(f"job {data['job_id']} succeeded: {json.dumps(output)}", flush=True)
    elif event["type"] == "job.failed":
        print(f"job {data['job_id']} failed: {json.dumps(data.get('error'))}", flush=True)
    else:
        print(f"{event['type']}: {json.dumps(data)}", flush=True)


def make_handler(verifiers: list[Webhook], seen: Seen) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            if length > MAX_BODY:
                self.answer(413)
                return
            body = self.rfile.read(length)
            try:
                event = verify(verifiers, body, {k: v for k, v in self.headers.items()})
            except WebhookVerificationError as exc:
                print(f"refused a delivery: {exc}", file=sys.stderr, flush=True)
                self.answer(400)
                return
            if seen.first_time(self.headers["webhook-id"]):
                handle(event)
            self.answer(204)

        def answer(self, status: int) -> None:
            self.send_response(status)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()
    secrets = [s for s in (os.environ.get("WEBHOOK_SECRET"), os.environ.get("WEBHOOK_PREVIOUS_SECRET")) if s]
    if not secrets:
        sys.exit("WEBHOOK_SECRET is not set (the whsec_... secret PIE answered when the webhook was created)")
    server = ThreadingHTTPServer((args.host, args.port), make_handler([Webhook(s) for s in secrets], Seen()))
    print(f"receiving PIE webhooks on http://{args.host}:{args.port}/", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
