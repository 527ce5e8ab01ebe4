"""Where a webhook may point (spec 15.6): ``https`` URLs whose host resolves to public addresses
only. Checked when a webhook is created or its URL changed (422), and again at every connection
the delivery loop opens (``GuardedNetworkBackend``): the name is resolved, every address checked,
and the connection made to the address that was checked, so a name that is re-pointed at a
private address after the check (DNS rebinding) gets nothing.

``PIE_WEBHOOKS_ALLOW_HTTP`` / ``PIE_WEBHOOKS_ALLOW_PRIVATE`` lift the rules for development.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from typing import Any
from urllib.parse import urlsplit

import httpcore

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
RESOLVE_TIMEOUT = 5.0


class UnsafeTarget(Exception):
    """The URL or the addresses its host resolves to are not allowed."""


def address_problem(address: IPAddress) -> str | None:
    """Why a connection to ``address`` is refused (None: a public address)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_unspecified:
        return "an unspecified address"
    if address.is_multicast:
        return "a multicast address"
    if address.is_private:
        return "a private address"
    if not address.is_global:
        return "a reserved (not publicly routable) address"
    return None


def url_problem(url: str, *, allow_http: bool) -> str | None:
    """What is wrong with ``url`` as a webhook target, before any DNS lookup (None: fine)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return f"invalid URL: {exc}"
    schemes = ("https", "http") if allow_http else ("https",)
    if parts.scheme not in schemes:
        if parts.scheme == "http":
            return "webhook URLs must use https (PIE_WEBHOOKS_ALLOW_HTTP=true allows http for development)"
        return "webhook URLs must be absolute https:// URLs"
    if not parts.hostname:
        return "the URL has no host"
    if parts.username is not None or parts.password is not None:
        return "credentials in the URL are not allowed (the receiver verifies the signature instead)"
    if port == 0:
        return "port 0 is not a valid port"
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in url):
        return "the URL contains whitespace or control characters"
    return None


def _literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return None


async def resolve(host: str, port: int) -> list[IPAddress]:
    """The addresses ``host`` resolves to (an IP literal: itself). UnsafeTarget when it does not
    resolve within a few seconds."""
    literal = _literal(host)
    if literal is not None:
        return [literal]
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP), RESOLVE_TIMEOUT
        )
    except (OSError, TimeoutError, UnicodeError) as exc:
        raise UnsafeTarget(f"host {host} does not resolve ({exc.__class__.__name__}: {exc})") from None
    addresses: list[IPAddress] = []
    for info in infos:
        address = _literal(str(info[4][0]))
        if address is not None and address not in addresses:
            addresses.append(address)
    if not addresses:
        raise UnsafeTarget(f"host {host} does not resolve")
    return addresses


async def checked_addresses(host: str, port: int, *, allow_private: bool) -> list[IPAddress]:
    """``host``'s addresses, every one of them public unless ``allow_private`` (UnsafeTarget
    naming the first that is not: a name with any private address is refused as a whole)."""
    addresses = await resolve(host, port)
    if not allow_private:
        for address in addresses:
            problem = address_problem(address)
            if problem is not None:
                what = host if _literal(host) is not None else f"{host} resolves to {address}, which"
                raise UnsafeTarget(
                    f"{what} is {problem}; webhooks may only target public addresses "
                    "(PIE_WEBHOOKS_ALLOW_PRIVATE=true allows private targets for development)"
                )
    return addresses


async def check_target(url: str, *, allow_http: bool, allow_private: bool) -> None:
    """The creation-time check of a webhook URL (UnsafeTarget with the reason)."""
    problem = url_problem(url, allow_http=allow_http)
    if problem is not None:
        raise UnsafeTarget(problem)
    parts = urlsplit(url)
    assert parts.hostname is not None
    await checked_addresses(
        parts.hostname, parts.port or (443 if parts.scheme == "https" else 80), allow_private=allow_private
    )


class AsyncioStream(httpcore.AsyncNetworkStream):
    """httpcore's network stream on plain asyncio streams (its own backend goes through anyio,
    whose per-call overhead was a fifth of a delivery's CPU time); TLS by ``StreamWriter.start_tls``."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self._reader, self._writer = reader, writer
        self._unsent: list[bytes] = []
        self._unsent_bytes = 0

    async def _flush(self) -> None:
        data = b"".join(self._unsent)
        self._unsent, self._unsent_bytes = [], 0
        self._writer.write(data)
        await self._writer.drain()

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            async with asyncio.timeout(timeout):
                if self._unsent:
                    await self._flush()
                return await self._reader.read(max_bytes)
        except TimeoutError:
            raise httpcore.ReadTimeout("timed out reading the answer") from None
        except OSError as exc:
            raise httpcore.ReadError(str(exc) or exc.__class__.__name__) from exc

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        # a request's head and body leave in one send when it is read after (one syscall, one
        # segment): the writes are held until the answer is read or they grow past 64 KiB
        self._unsent.append(buffer)
        self._unsent_bytes += len(buffer)
        if self._unsent_bytes < 65536:
            return
        try:
            async with asyncio.timeout(timeout):
                await self._flush()
        except TimeoutError:
            raise httpcore.WriteTimeout("timed out sending the request") from None
        except OSError as exc:
            raise httpcore.WriteError(str(exc) or exc.__class__.__name__) from exc

    async def aclose(self) -> None:
        self._writer.close()

    async def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.AsyncNetworkStream:
        try:
            async with asyncio.timeout(timeout):
                await self._writer.start_tls(ssl_context, server_hostname=server_hostname)
        except TimeoutError:
            self._writer.close()
            raise httpcore.ConnectTimeout("timed out in the TLS handshake") from None
        except (ssl.SSLError, OSError) as exc:
            self._writer.close()
            raise httpcore.ConnectError(str(exc) or exc.__class__.__name__) from exc
        return self

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":  # an idle keep-alive connection the server closed
            return self._reader.at_eof() or self._writer.is_closing()
        if info == "ssl_object":
            return self._writer.get_extra_info("ssl_object")
        if info == "client_addr":
            return self._writer.get_extra_info("sockname")
        if info == "server_addr":
            return self._writer.get_extra_info("peername")
        if info == "socket":
            return self._writer.get_extra_info("socket")
        return None


class GuardedNetworkBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend with the address check at every connection: resolve the
    host once, refuse it unless every address is allowed, connect to a checked address (plain
    asyncio streams, :class:`AsyncioStream`). TLS is still negotiated (SNI) and verified for
    the host name of the URL."""

    def __init__(self, *, allow_private: bool):
        self.allow_private = allow_private

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.AsyncNetworkStream:
        addresses = await checked_addresses(host, port, allow_private=self.allow_private)
        last: Exception | None = None
        for address in addresses:
            try:
                async with asyncio.timeout(timeout):
                    reader, writer = await asyncio.open_connection(
                        str(address), port, local_addr=(local_address, 0) if local_address else None
                    )
            except TimeoutError:
                last = httpcore.ConnectTimeout(f"timed out connecting to {address} port {port}")
                continue
            except OSError as exc:
                last = httpcore.ConnectError(str(exc) or exc.__class__.__name__)
                continue
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return AsyncioStream(reader, writer)
        assert last is not None
        raise last

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Any = None
    ) -> httpcore.AsyncNetworkStream:
        raise UnsafeTarget("webhooks never connect to unix sockets")

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
