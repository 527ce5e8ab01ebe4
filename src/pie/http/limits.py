"""HTTP-level limits of ``pie serve``: what the server accepts before any PIE code runs.

uvicorn runs its default httptools parser (C; pure-Python h11 cost PIE 15-20% of its read
throughput) through :class:`PieHttpToolsProtocol`, which adds what uvicorn lacks:
- a bounded request head (PIE_HTTP_MAX_HEADER_BYTES): measured on the bytes as they arrive, so
  a 64 MB header costs a few reads, not the event loop or memory;
- deadlines for a request that never completes (slowloris: a head trickled a byte at a time, or
  a body that never arrives): PIE_HTTP_HEADER_TIMEOUT_SECONDS / PIE_HTTP_BODY_TIMEOUT_SECONDS.

uvicorn's own options do the rest (see :func:`uvicorn_options`): ``timeout_keep_alive``
(PIE_HTTP_KEEP_ALIVE_SECONDS) closes idle keep-alive connections; ``limit_concurrency``
(PIE_HTTP_LIMIT_CONCURRENCY) answers 503 beyond that many open connections or in-flight requests
per process; ``backlog`` bounds the accept queue. The header *count* has no server option:
:class:`HeaderCountGuard` (pure ASGI, in the app) answers 431 beyond PIE_HTTP_MAX_HEADERS.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from pie.config import Settings
from pie.errors import envelope

log = logging.getLogger("pie.http")


class PieHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol (its default, the C parser) with a bounded request head and
    deadlines for incomplete requests.

    httptools has no head limit and joins a long header value in memory before any callback
    sees it, so the head is measured here, on the bytes as they arrive and before the parser
    gets them: past PIE_HTTP_MAX_HEADER_BYTES the connection gets a 400 and is closed, after at
    most one read (64 KiB) more. A connection whose head is not complete PIE_HTTP_HEADER_TIMEOUT_SECONDS
    after it opened (or after the first byte of its next keep-alive request), or whose body is
    not complete PIE_HTTP_BODY_TIMEOUT_SECONDS after its head, is closed; more bytes never push
    a deadline back (that is what slowloris does). Settings are read in each serving process
    (a plain class: uvicorn pickles it into every --workers process)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        from pie.config import get_settings

        settings = get_settings()
        self.header_timeout = settings.http_header_timeout_seconds
        self.body_timeout = settings.http_body_timeout_seconds
        self.max_head_bytes = settings.http_max_header_bytes
        self._head_bytes = 0
        self._in_head = True  # waiting for (the rest of) a request head
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

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm("head", self.header_timeout)

    def data_received(self, data: bytes) -> None:
        if self._in_head and data:
            if self._deadline_phase != "head":  # the first bytes of the next keep-alive request
                self._arm("head", self.header_timeout)
            end = data.find(b"\r\n\r\n")
            self._head_bytes += len(data) if end < 0 else end
            if self._head_bytes > self.max_head_bytes:
                self._disarm()
                log.info("closing a connection from %s: request head over %d bytes", self.client, self.max_head_bytes)
                self.send_400_response(f"Request head larger than {self.max_head_bytes} bytes.")
                return
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        self._arm("body", self.body_timeout)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm()
        self._in_head = True
        super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.run`` / ``uvicorn.Config`` carrying the HTTP limits."""
    return {
        "http": PieHttpToolsProtocol,
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
