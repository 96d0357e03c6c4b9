"""Serving the app on uvicorn (uvloop + httptools), in one process or ``--workers N``.

The HTTP/1.1 protocol is uvicorn's :class:`HttpToolsProtocol`. :class:`ProxyHttpProtocol` adds
what uvicorn does not do at the header phase:

* a limit on the request line plus headers (``max_header_bytes``), checked on every read, so an
  endless header line cannot grow the process (answered 400, connection closed);
* a deadline for the headers once a request has begun (``header_timeout``; answered 408), so a
  client trickling its headers cannot hold a connection forever;
* a write deadline: a connection whose writes stay paused (the client does not read) for
  ``write_timeout`` seconds is dropped, on every route;
* the scope extensions of asgi.py: ``abort``, ``on_disconnect`` (a callback on connection loss,
  cheaper than a task per request watching ``receive()``) and ``write_timeout``.

Everything else (pipelining, ``100-continue`` only when the body is read, HEAD without a body,
``lenient_data_after_close``) is uvicorn's. ``--workers N`` runs uvicorn's multiprocess
supervisor over one shared listening socket; the processes merge their metrics through
prometheus_client's multiprocess directory and share ``/workers`` changes through a state file.
SIGTERM stops accepting and lets requests in flight (streams included) finish within
``shutdown_grace`` seconds.
"""

from __future__ import annotations

import asyncio
import functools
import socket
from collections.abc import Callable
from typing import Any

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.supervisors import Multiprocess

from lmcache_disagg.errors import ConfigError
from lmcache_disagg.proxy.app import create_app
from lmcache_disagg.proxy.asgi import (
    ABORT_EXTENSION,
    DISCONNECT_EXTENSION,
    WRITE_TIMEOUT_EXTENSION,
)
from lmcache_disagg.proxy.settings import ProxySettings

__all__ = ["ProxyConfig", "ProxyHttpProtocol", "make_listen_socket", "run"]

_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


class ProxyConfig(uvicorn.Config):
    """uvicorn's Config plus the header-phase limits read by :class:`ProxyHttpProtocol`."""

    def __init__(
        self,
        app: Any,
        *,
        max_header_bytes: int,
        header_timeout: float,
        write_timeout: float,
        **kwargs: Any,
    ) -> None:
        super().__init__(app, **kwargs)
        self.max_header_bytes = max_header_bytes
        self.header_timeout = header_timeout
        self.write_timeout = write_timeout


def _reject(transport: asyncio.Transport, status: int, reason: bytes, message: bytes) -> None:
    body = b'{"error":{"message":"%s","type":"invalid_request_error","param":null,"code":%d}}' % (
        message,
        status,
    )
    transport.write(
        b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
        b"connection: close\r\n\r\n%s" % (status, reason, len(body), body)
    )
    transport.close()


class ProxyHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with header-phase limits and the abort extension."""

    def __init__(self, config: uvicorn.Config, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        self._max_header_bytes: int = getattr(config, "max_header_bytes", 64 * 1024)
        self._header_timeout: float = getattr(config, "header_timeout", 30.0)
        self._in_headers = True
        self._header_bytes = 0  # raw bytes read in the header phase (catches endless lines)
        self._parsed_bytes = 0  # request line and header fields parsed so far
        self._header_timer: asyncio.TimerHandle | None = None
        self._write_timeout: float = getattr(config, "write_timeout", 60.0)
        self._write_timer: asyncio.TimerHandle | None = None
        self._on_lost: Callable[[], None] | None = None

    def data_received(self, data: bytes) -> None:
        if self._in_headers:
            if not self._header_bytes:
                self._header_timer = self.loop.call_later(
                    self._header_timeout, self._headers_too_slow
                )
            self._header_bytes += len(data)
        super().data_received(data)
        if self._in_headers and self._header_bytes > self._max_header_bytes:
            self._cancel_header_timer()
            if not self.transport.is_closing():
                _reject(self.transport, 400, b"Bad Request", b"request headers too large")

    def on_url(self, url: bytes) -> None:
        self._parsed_bytes += len(url)
        if self._parsed_bytes > self._max_header_bytes:
            raise httptools.HttpParserError("request line too long")
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._parsed_bytes += len(name) + len(value) + 4
        if self._parsed_bytes > self._max_header_bytes:
            raise httptools.HttpParserError("request headers too large")
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._parsed_bytes = 0
        self._in_headers = False
        self._header_bytes = 0
        self._cancel_header_timer()
        super().on_headers_complete()
        extensions: dict[Any, Any] = self.scope.setdefault("extensions", {})
        extensions[ABORT_EXTENSION] = self.transport.abort
        extensions[DISCONNECT_EXTENSION] = self._register_on_lost
        extensions[WRITE_TIMEOUT_EXTENSION] = self._write_timeout

    def _register_on_lost(self, callback: Callable[[], None]) -> Callable[[], None]:
        self._on_lost = callback
        return self._unregister_on_lost

    def _unregister_on_lost(self) -> None:
        self._on_lost = None

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(self._write_timeout, self._write_stalled)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _write_stalled(self) -> None:
        self._write_timer = None
        self.transport.abort()  # the client stopped reading

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_headers = True

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        super().connection_lost(exc)
        on_lost, self._on_lost = self._on_lost, None
        if on_lost is not None:
            on_lost()

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self._in_headers and not self.transport.is_closing():
            _reject(
                self.transport, 408, b"Request Timeout", b"request headers not received in time"
            )


def make_listen_socket(host: str, port: int) -> socket.socket:
    """A bound, listening TCP socket; a ConfigError names the address if it cannot be had."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except (OSError, OverflowError) as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc}") from None
    sock.set_inheritable(True)
    return sock


def _log_config(level: str) -> dict[str, Any]:
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": {"format": _LOG_FORMAT}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "default",
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"handlers": ["stderr"], "level": level.upper()},
    }


def build_config(settings: ProxySettings, log_level: str = "info") -> ProxyConfig:
    return ProxyConfig(
        functools.partial(create_app, settings),
        factory=True,
        max_header_bytes=settings.max_header_bytes,
        header_timeout=settings.header_timeout,
        write_timeout=settings.write_timeout,
        loop="uvloop",
        http=ProxyHttpProtocol,
        ws="none",
        lifespan="on",
        log_config=_log_config(log_level),
        log_level=log_level.lower(),
        access_log=False,
        server_header=False,
        proxy_headers=False,
        timeout_keep_alive=int(max(settings.keep_alive_timeout, 1)),
        timeout_graceful_shutdown=int(max(settings.shutdown_grace, 1)),
        workers=settings.workers,
        backlog=2048,
    )


def run(settings: ProxySettings, log_level: str = "info") -> None:
    """Serve until SIGINT/SIGTERM (then drain requests in flight)."""
    sock = make_listen_socket(settings.host, settings.port)
    config = build_config(settings, log_level)
    if settings.workers == 1:
        uvicorn.Server(config).run(sockets=[sock])
    else:
        Multiprocess(config, sockets=[sock]).run()
