"""A small, fast HTTP/1.1 server core on asyncio + httptools (used by the proxy and the stubs).

Why not Starlette/uvicorn: the proxy's whole job is per-request overhead, and an ASGI stack adds
several layers of dict/message passing per request and per streamed chunk. This core gives the
handler the parsed request and a :class:`Responder`, and maps a client disconnect straight to the
cancellation of the handler task (so the proxy cancels both upstream legs at once).

Contract:

* :func:`serve` is called once per process; it returns the listening ``asyncio.Server``.
* The handler is called once per request, in the event loop, with requests of one connection
  handled strictly in order (pipelining is allowed but not parallelised).
* If the client goes away, the running handler task is cancelled (``CancelledError`` is raised in
  it at its next await). Handlers must not swallow that cancellation.
* Bodies larger than ``max_body`` are refused with 413 without calling the handler.
* Keep-alive connections idle for ``keep_alive_timeout`` seconds are closed, a request whose
  headers+body take longer than ``request_read_timeout`` is answered 408, and a client that stops
  reading a streamed answer for ``write_timeout`` seconds is disconnected.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from http import HTTPStatus
from typing import cast

import httptools

__all__ = ["Handler", "Request", "Responder", "ServerLimits", "serve"]

_REASONS: dict[int, bytes] = {s.value: s.phrase.encode() for s in HTTPStatus}
_MAX_PIPELINED = 16


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """Limits of the HTTP server core. Every wait has a deadline; every buffer is bounded."""

    max_body: int = 4 * 1024 * 1024
    max_header_bytes: int = 64 * 1024
    keep_alive_timeout: float = 75.0
    request_read_timeout: float = 30.0
    write_timeout: float = 60.0
    """A streaming write waits at most this long for a slow client before the connection drops."""


class Request:
    """One parsed request. ``headers`` keys are lower-case bytes; values are raw bytes."""

    __slots__ = ("body", "headers", "keep_alive", "method", "path", "query")

    def __init__(
        self,
        method: bytes,
        path: str,
        query: bytes,
        headers: dict[bytes, bytes],
        body: bytes,
        keep_alive: bool,
    ) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive


class Responder:
    """Writes exactly one response for one request (plain or chunked-streaming).

    Called only from the handler task. ``started`` says whether the status line went out (after
    that, errors can only be reported inside the body). ``closed`` is true once the client is gone.
    """

    __slots__ = ("_conn", "_keep_alive", "_streaming", "finished", "started", "status")

    def __init__(self, conn: _Connection, keep_alive: bool) -> None:
        self._conn = conn
        self._keep_alive = keep_alive
        self._streaming = False
        self.started = False
        self.finished = False
        self.status = 0

    @property
    def closed(self) -> bool:
        return self._conn.closed

    def _head(self, status: int, headers: Iterable[tuple[bytes, bytes]], extra: bytes) -> bytes:
        parts = [b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Unknown"))]
        for name, value in headers:
            parts.append(name + b": " + value + b"\r\n")
        if not self._keep_alive:
            parts.append(b"connection: close\r\n")
        parts.append(extra)
        return b"".join(parts)

    def send(
        self,
        status: int,
        body: bytes,
        headers: Iterable[tuple[bytes, bytes]] = (),
        content_type: bytes = b"application/json",
    ) -> None:
        """Send a complete response with a Content-Length body."""
        if self.started:
            raise RuntimeError("response already started")
        self.started = self.finished = True
        self.status = status
        head = self._head(
            status,
            headers,
            b"content-type: %s\r\ncontent-length: %d\r\n\r\n" % (content_type, len(body)),
        )
        self._conn.write(head + body)

    def start_stream(
        self,
        status: int,
        headers: Iterable[tuple[bytes, bytes]] = (),
        content_type: bytes = b"text/event-stream",
        first_chunk: bytes = b"",
        end: bool = False,
    ) -> None:
        """Send the status line and headers of a chunked response (optionally with a first chunk).

        ``end=True`` also terminates the response, all in one write (one syscall).
        """
        if self.started:
            raise RuntimeError("response already started")
        self.started = True
        self._streaming = True
        self.status = status
        head = self._head(
            status,
            headers,
            b"content-type: %s\r\ncache-control: no-cache\r\n"
            b"transfer-encoding: chunked\r\n\r\n" % content_type,
        )
        if first_chunk:
            head += b"%x\r\n%s\r\n" % (len(first_chunk), first_chunk)
        if end:
            head += b"0\r\n\r\n"
            self.finished = True
        self._conn.write(head)

    async def write(self, chunk: bytes) -> None:
        """Write one body chunk of a streaming response; waits while the client is slow."""
        if chunk:
            self._conn.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            await self._conn.drain()

    def end_stream(self, last_chunk: bytes = b"") -> None:
        """Terminate a streaming response (the connection stays usable for keep-alive)."""
        if not self.finished:
            self.finished = True
            if last_chunk:
                self._conn.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(last_chunk), last_chunk))
            else:
                self._conn.write(b"0\r\n\r\n")

    def abort(self, reset: bool = False) -> None:
        """Drop the connection (used when a streamed response cannot be finished cleanly).

        ``reset=True`` sends a TCP RST instead of a FIN (the stubs use it to inject resets).
        """
        self.finished = True
        self._conn.abort(reset)


Handler = Callable[[Request, Responder], Awaitable[None]]


class _Connection(asyncio.Protocol):
    __slots__ = (
        "_body",
        "_body_size",
        "_drain_waiter",
        "_handler",
        "_header_bytes",
        "_headers",
        "_idle_handle",
        "_limits",
        "_loop",
        "_parser",
        "_paused",
        "_queue",
        "_reading_paused",
        "_task",
        "_too_large",
        "_transport",
        "_url",
        "closed",
    )

    def __init__(self, handler: Handler, limits: ServerLimits) -> None:
        self._handler = handler
        self._limits = limits
        self._loop = asyncio.get_running_loop()
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._queue: deque[Request | None] = deque()
        self._task: asyncio.Task[None] | None = None
        self._paused = False
        self._reading_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._idle_handle: asyncio.TimerHandle | None = None
        self._url = b""
        self._headers: dict[bytes, bytes] = {}
        self._header_bytes = 0
        self._body: list[bytes] = []
        self._body_size = 0
        self._too_large = False
        self.closed = False

    # -- asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have the same API.
        self._transport = cast(asyncio.Transport, transport)
        sock = self._transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._arm_idle(self._limits.keep_alive_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._cancel_idle()
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_exception(ConnectionResetError("client disconnected"))

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._reject(400, b"upgrade not supported")
        except httptools.HttpParserError:
            self._reject(400, b"malformed HTTP request")

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)
        self._drain_waiter = None

    # -- httptools callbacks ----------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = {}
        self._header_bytes = 0
        self._body = []
        self._body_size = 0
        self._too_large = False
        self._arm_idle(self._limits.request_read_timeout, status=408)

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._header_bytes += len(url)
        if self._header_bytes > self._limits.max_header_bytes:
            raise httptools.HttpParserError("request line too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value)
        if self._header_bytes > self._limits.max_header_bytes:
            raise httptools.HttpParserError("headers too large")
        self._headers[name.lower()] = value

    def on_headers_complete(self) -> None:
        length = self._headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self._limits.max_body:
            self._too_large = True
        elif (
            self._headers.get(b"expect", b"").lower() == b"100-continue"
            and self._transport is not None
        ):
            # curl sends this for bodies over 1 KiB and would otherwise stall for a second.
            self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        if self._too_large:
            return
        self._body_size += len(body)
        if self._body_size > self._limits.max_body:
            self._too_large = True
            self._body = []
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._cancel_idle()
        if self._too_large:
            self._reject(413, b"request body too large")
            return
        parsed = httptools.parse_url(self._url or b"/")
        path = (parsed.path or b"/").decode("latin-1")
        request = Request(
            self._parser.get_method(),
            path,
            parsed.query or b"",
            self._headers,
            b"".join(self._body) if len(self._body) != 1 else self._body[0],
            self._parser.should_keep_alive(),
        )
        self._queue.append(request)
        if len(self._queue) >= _MAX_PIPELINED and self._transport is not None:
            self._transport.pause_reading()
            self._reading_paused = True
        if self._task is None:
            self._task = self._loop.create_task(self._run())

    # -- request processing -----------------------------------------------------------------
    async def _run(self) -> None:
        try:
            while self._queue and not self.closed:
                request = self._queue.popleft()
                if request is None:
                    break
                if self._reading_paused and self._transport is not None:
                    self._transport.resume_reading()
                    self._reading_paused = False
                responder = Responder(self, request.keep_alive)
                try:
                    await self._handler(request, responder)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    if not responder.started and not self.closed:
                        responder.send(
                            500,
                            b'{"error":{"message":"internal error","type":"internal_error",'
                            b'"code":500}}',
                        )
                    elif not responder.finished:
                        responder.abort()
                if not responder.finished and not self.closed:
                    # A handler that forgot to answer still leaves the connection consistent.
                    if responder.started:
                        responder.end_stream()
                    else:
                        responder.send(500, b'{"error":{"message":"no response"}}')
                if not request.keep_alive and self._transport is not None:
                    self._transport.close()
                    return
            if not self.closed:
                self._arm_idle(self._limits.keep_alive_timeout)
        finally:
            self._task = None
            if self._queue and not self.closed:
                self._task = self._loop.create_task(self._run())

    def _reject(self, status: int, message: bytes) -> None:
        if self._transport is None or self.closed:
            return
        body = b'{"error":{"message":"%s","type":"invalid_request_error","code":%d}}' % (
            message,
            status,
        )
        self._transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n%s" % (status, _REASONS.get(status, b""), len(body), body)
        )
        self._transport.close()
        self.closed = True

    def _arm_idle(self, timeout: float, status: int = 0) -> None:
        self._cancel_idle()
        self._idle_handle = self._loop.call_later(timeout, self._on_idle, status)

    def _cancel_idle(self) -> None:
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None

    def _on_idle(self, status: int) -> None:
        self._idle_handle = None
        if self._task is not None:
            return  # a handler is running; its own deadlines apply
        if status:
            self._reject(status, b"request not received in time")
        elif self._transport is not None:
            self._transport.close()

    # -- used by Responder ------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        if not self.closed and self._transport is not None:
            self._transport.write(data)

    async def drain(self) -> None:
        if self.closed:
            raise ConnectionResetError("client disconnected")
        if not self._paused:
            return
        if self._drain_waiter is None:
            self._drain_waiter = self._loop.create_future()
        waiter = self._drain_waiter
        handle = self._loop.call_later(self._limits.write_timeout, _expire, waiter)
        try:
            await waiter
        finally:
            handle.cancel()

    def abort(self, reset: bool = False) -> None:
        if self._transport is not None:
            if reset:
                sock = self._transport.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self._transport.abort()
        self.closed = True


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError("client did not read the response in time"))


def make_listen_socket(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """A bound, listening TCP socket (``SO_REUSEPORT`` lets several processes share the port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


async def serve(
    handler: Handler,
    sock: socket.socket,
    limits: ServerLimits | None = None,
) -> asyncio.Server:
    """Start serving ``handler`` on an already-bound listening socket."""
    lim = limits or ServerLimits()
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: _Connection(handler, lim), sock=sock, backlog=2048)
