"""The thin ASGI adapter of the generate routes (``/v1/completions``, ``/v1/chat/completions``).

:class:`GenerateEndpoint` is a raw ASGI endpoint mounted as a route of the FastAPI app (FastAPI's
per-request layers are measurable at the proxy's request rates). Per request it:

1. answers other methods 405 (with ``Allow``), and refuses (401, 429) before reading the body;
2. reads the body within ``settings.body_timeout`` seconds (408) and at most ``settings.max_body``
   bytes, refusing more with 413 as soon as it is seen (Content-Length, else while reading);
3. runs :meth:`ProxyApp.generate` and sends its :class:`~lmcache_disagg.proxy.pd.Reply`; each send
   waits at most ``settings.write_timeout`` seconds for a client that does not read, which is then
   dropped;
4. watches for ``http.disconnect`` while it waits: the client going away cancels the request (and
   so both upstream legs) at once.

Under the proxy's own server (server.py) the protocol does two of these per connection rather
than per request, which the profile showed is worth it: it drops a connection whose writes stay
paused for ``write_timeout`` (scope extension ``lmcache_disagg.write_timeout``), and it calls back
on connection loss (``lmcache_disagg.on_disconnect``) instead of a watcher task per request. Under
another ASGI server the adapter bounds each send itself and watches ``receive()`` for
``http.disconnect``; it drops a client through ``lmcache_disagg.abort`` where that exists, and
otherwise raises, which makes the server close the connection.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from lmcache_disagg.proxy.pd import Reply
from lmcache_disagg.proxy.service import ProxyApp

__all__ = [
    "ABORT_EXTENSION",
    "DISCONNECT_EXTENSION",
    "WRITE_TIMEOUT_EXTENSION",
    "GenerateEndpoint",
    "send_reply",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

ABORT_EXTENSION = "lmcache_disagg.abort"
"""``abort()``: drop the connection now."""
DISCONNECT_EXTENSION = "lmcache_disagg.on_disconnect"
"""``register(callback) -> unregister``: ``callback()`` runs when the connection is lost."""
WRITE_TIMEOUT_EXTENSION = "lmcache_disagg.write_timeout"
"""Present when the server drops connections whose writes stall (its value: the seconds)."""
_SSE_HEADERS = ((b"cache-control", b"no-cache"),)
_SLICE = 256 * 1024


class ClientGone(Exception):
    """The client disconnected or stopped reading; the connection is being dropped."""


class _Disconnected(Exception):
    pass


class _TooLarge(Exception):
    pass


def _abort(scope: Scope) -> None:
    abort = scope.get("extensions", {}).get(ABORT_EXTENSION)
    if abort is None:
        raise ClientGone("client stopped reading the response")
    abort()


async def _send(send: Send, message: Message, timeout: float | None) -> None:
    """One send, waiting at most ``timeout`` seconds (None: the server bounds it itself)."""
    try:
        if timeout is None:
            await send(message)
            return
        async with asyncio.timeout(timeout):
            await send(message)
    except TimeoutError:
        raise ClientGone("client stopped reading the response") from None
    except OSError as exc:  # e.g. uvicorn's ClientDisconnected
        raise ClientGone("client went away") from exc


def _head(reply: Reply, length: int | None) -> Message:
    headers = [(b"content-type", reply.content_type), *reply.headers]
    if length is not None:
        headers.append((b"content-length", b"%d" % length))
    else:
        headers.extend(_SSE_HEADERS)
    return {"type": "http.response.start", "status": reply.status, "headers": headers}


class _Watch:
    """Cancels the current task when the client disconnects (until :meth:`stop`)."""

    __slots__ = ("_task", "_unregister", "disconnected", "done", "watcher")

    def __init__(self, scope: Scope, receive: Receive) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self.done = False
        self.disconnected = False
        self.watcher: asyncio.Task[None] | None = None
        self._unregister: Callable[[], None] | None = None
        register = scope.get("extensions", {}).get(DISCONNECT_EXTENSION)
        if register is not None:
            self._unregister = register(self._lost)
        else:
            self.watcher = asyncio.get_running_loop().create_task(self._run(receive))

    def _lost(self) -> None:
        if not self.done:
            self.disconnected = True
            self._task.cancel()

    async def _run(self, receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self._lost()
                return

    def stop(self) -> None:
        self.done = True
        if self.watcher is not None:
            self.watcher.cancel()
        if self._unregister is not None:
            self._unregister()


async def send_reply(
    send: Send, reply: Reply, write_timeout: float | None, watch: _Watch | None = None
) -> None:
    """Send ``reply`` (closes its stream and releases it in every case).

    ``watch`` is told before the last message: from then on a disconnect event is the end of
    this response, not the client going away.
    """
    try:
        if reply.stream is None:
            body = reply.body
            await _send(send, _head(reply, len(body)), write_timeout)
            # A server waits for the client to drain before a send, not after it: a large body
            # goes out in slices so that each waits (bounded by the write timeout).
            cut = (len(body) - 1) // _SLICE * _SLICE if body else 0
            for start in range(0, cut, _SLICE):
                piece = body[start : start + _SLICE]
                await _send(send, {"type": "http.response.body", "body": piece, "more_body": True},
                            write_timeout)  # fmt: skip
            if watch is not None:
                watch.done = True
            last = body[cut:] if cut else body
            await _send(send, {"type": "http.response.body", "body": last}, write_timeout)
            return
        await _send(send, _head(reply, None), write_timeout)
        async for chunk in reply.stream:
            message = {"type": "http.response.body", "body": chunk, "more_body": True}
            await _send(send, message, write_timeout)
        if watch is not None:
            watch.done = True
        await _send(send, {"type": "http.response.body", "body": b""}, write_timeout)
    finally:
        if reply.stream is not None:
            await reply.stream.aclose()
        if reply.release is not None:
            reply.release()
            reply.release = None


async def _read_body(receive: Receive, limit: int, timeout: float) -> bytes:
    parts: list[bytes] = []
    size = 0
    async with asyncio.timeout(timeout):
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > limit:
                    raise _TooLarge
                parts.append(chunk)
            if not message.get("more_body", False):
                return parts[0] if len(parts) == 1 else b"".join(parts)


class GenerateEndpoint:
    """The raw ASGI endpoint of one generate route (chat or completions)."""

    def __init__(self, proxy: ProxyApp, chat: bool) -> None:
        self._proxy = proxy
        self._chat = chat
        # The workers' path, whatever the path this app is mounted under in a gateway.
        self._path = "/v1/chat/completions" if chat else "/v1/completions"
        s = proxy.settings
        self._max_body = s.max_body
        self._body_timeout = s.body_timeout
        self._write_timeout = s.write_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        proxy = self._proxy
        if scope["method"] != "POST":
            reply = proxy.error(405, "use POST", "invalid_request_error",
                                headers=((b"allow", b"POST"),))  # fmt: skip
            await send_reply(send, reply, self._write_timeout)
            return
        authorization = given_id = length = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value
            elif name == b"x-request-id":
                given_id = value
            elif name == b"content-length":
                length = value
        started = time.perf_counter()
        extensions = scope.get("extensions") or {}
        write_timeout = None if WRITE_TIMEOUT_EXTENSION in extensions else self._write_timeout
        rid = proxy.request_id(given_id)
        refusal = proxy.refuse(authorization, rid)
        if refusal is not None:
            proxy.count(self._chat, refusal.status, started, rid)
            await send_reply(send, refusal, write_timeout)
            return
        status = 499
        ctx = None
        watch: _Watch | None = None
        try:
            if length is not None and length.isdigit() and int(length) > self._max_body:
                raise _TooLarge
            raw = await _read_body(receive, self._max_body, self._body_timeout)
            watch = _Watch(scope, receive)
            reply, ctx = await proxy.generate(rid, self._path, self._chat, raw)
            status = reply.status
            await send_reply(send, reply, write_timeout, watch)
        except _TooLarge:
            status = 413
            reply = proxy.error(413, "request body too large", "invalid_request_error", rid,
                                headers=((b"connection", b"close"),))  # fmt: skip
            await send_reply(send, reply, write_timeout)
        except TimeoutError:
            status = 408
            reply = proxy.error(408, "request body not received in time",
                                "invalid_request_error", rid,
                                headers=((b"connection", b"close"),))  # fmt: skip
            await send_reply(send, reply, write_timeout)
        except _Disconnected:
            status = 499
        except ClientGone:
            status = 499
            _abort(scope)
        except asyncio.CancelledError:
            if watch is None or not watch.disconnected:
                raise
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            status = 499  # the client went away; both upstream legs were cancelled with us
        finally:
            if watch is not None:
                watch.stop()
            proxy.finish(rid, self._chat, status, started, ctx)
