"""HTTP-level limits of ``pie serve``: what the server accepts before any PIE code runs.

uvicorn's own options do most of it (see :func:`uvicorn_options`):
- the request head (request line + every header) is bounded by h11's
  ``max_incomplete_event_size`` (PIE_HTTP_MAX_HEADER_BYTES): h11 refuses a longer head as soon as
  its buffer passes the limit, so a 64 MB header costs a few reads, not the event loop. We run
  h11 rather than httptools because uvicorn's httptools protocol has no head limit at all (and
  httptools concatenates a long header value chunk by chunk before any callback could object);
- ``timeout_keep_alive`` (PIE_HTTP_KEEP_ALIVE_SECONDS) closes idle keep-alive connections;
- ``limit_concurrency`` (PIE_HTTP_LIMIT_CONCURRENCY) answers 503 beyond that many open
  connections or in-flight requests per process; ``backlog`` bounds the accept queue.

uvicorn has no timeout for a request that never completes (slowloris: a head trickled a byte at
a time, or a body that never arrives): :class:`PieH11Protocol` adds one — a connection whose
request head is not complete PIE_HTTP_HEADER_TIMEOUT_SECONDS after it opened (or after its
first byte following a response), or whose body is not complete PIE_HTTP_BODY_TIMEOUT_SECONDS
after its head, is closed. The header *count* has no server option: :class:`HeaderCountGuard`
(pure ASGI, in the app) answers 431 beyond PIE_HTTP_MAX_HEADERS.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import h11
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from pie.config import Settings
from pie.errors import envelope

log = logging.getLogger("pie.http")


class PieH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for incomplete requests."""

    header_timeout: float = 10.0
    body_timeout: float = 60.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # the deadlines come from the settings of the process serving the connection (a plain
        # class, not one built per call: uvicorn pickles it into every --workers process)
        from pie.config import get_settings

        settings = get_settings()
        self.header_timeout = settings.http_header_timeout_seconds
        self.body_timeout = settings.http_body_timeout_seconds
        self._request_deadline: asyncio.TimerHandle | None = None
        self._deadline_phase: str | None = None

    def _arm(self, phase: str, seconds: float) -> None:
        self._disarm()
        self._deadline_phase = phase
        self._request_deadline = self.loop.call_later(seconds, self._request_timed_out)

    def _disarm(self) -> None:
        if self._request_deadline is not None:
            self._request_deadline.cancel()
        self._request_deadline = None
        self._deadline_phase = None

    def _request_timed_out(self) -> None:
        self._request_deadline = None
        if self.transport is None or self.transport.is_closing():
            return
        log.info("closing a connection from %s: request %s incomplete", self.client, self._deadline_phase)
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        self.transport.close()

    def _track(self) -> None:
        """Arm or disarm the deadline from where the client is in its request. A deadline is
        never pushed back by more bytes of the same head or body (that is what slowloris does)."""
        state = self.conn.their_state
        if state is h11.IDLE:
            # between requests: a silent client is the keep-alive timer's; the first bytes of
            # the next request start the head deadline
            if self.conn.trailing_data[0] and self._deadline_phase != "head":
                self._arm("head", self.header_timeout)
        elif state is h11.SEND_BODY:
            if self._deadline_phase != "body":
                self._arm("body", self.body_timeout)
        else:  # DONE, MUST_CLOSE, CLOSED, ERROR: the request is complete (or the connection done)
            self._disarm()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm("head", self.header_timeout)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._track()

    def on_response_complete(self) -> None:
        self._disarm()
        super().on_response_complete()
        self._track()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.run`` / ``uvicorn.Config`` carrying the HTTP limits."""
    return {
        "http": PieH11Protocol,
        "h11_max_incomplete_event_size": settings.http_max_header_bytes,
        "timeout_keep_alive": settings.http_keep_alive_seconds,
        "limit_concurrency": settings.http_limit_concurrency,
        "backlog": settings.http_backlog,
    }


class HeaderCountGuard:
    """431 envelope for a request with more than ``max_headers`` header fields."""

    def __init__(self, app: ASGIApp, max_headers: int):
        self.app = app
        self.max_headers = max_headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and len(scope.get("headers") or ()) > self.max_headers:
            message = f"too many header fields (the limit is {self.max_headers}, PIE_HTTP_MAX_HEADERS)"
            await envelope(431, message, {"Connection": "close"})(scope, receive, send)
            return
        await self.app(scope, receive, send)
