"""A real HTTP receiver on loopback for the webhook tests: a threaded ``http.server`` that
records every request (path, headers, body) and answers with planned statuses per path."""

from __future__ import annotations

import threading
import time
from collections import Counter, defaultdict, deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


class Receiver:
    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.plans: dict[str, deque[tuple[int, bytes]]] = defaultdict(deque)
        self.delays: dict[str, float] = {}  # seconds a path takes to answer
        # a path with a gate answers once the gate is set (the test holds its requests open)
        self.gates: dict[str, threading.Event] = {}
        self.active: Counter[str] = Counter()  # requests being answered, per path
        self.most_active: Counter[str] = Counter()  # the most at once, per path
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length)
                with receiver.lock:
                    receiver.active[self.path] += 1
                    receiver.most_active[self.path] = max(receiver.most_active[self.path], receiver.active[self.path])
                time.sleep(receiver.delays.get(self.path, 0.0))
                gate = receiver.gates.get(self.path)
                if gate is not None:
                    gate.wait(timeout=60)
                with receiver.lock:
                    receiver.active[self.path] -= 1
                with receiver.lock:
                    receiver.requests.append(Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                    plan = receiver.plans[self.path]
                    status, answer = plan.popleft() if plan else (200, b"ok")
                self.send_response(status)
                self.send_header("content-type", "text/plain")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, path: str = "/hook", host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def plan(self, path: str, *answers: int | tuple[int, bytes]) -> None:
        """The next answers to POSTs on ``path`` (status, or (status, body)); then 200."""
        with self.lock:
            for answer in answers:
                self.plans[path].append(answer if isinstance(answer, tuple) else (answer, b""))

    def on(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.requests if r.path == path]

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()


def wait_until(condition: Any, timeout: float = 30.0, interval: float = 0.05) -> None:
    """Poll ``condition()`` until true (AssertionError after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")
