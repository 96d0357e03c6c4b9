"""Exceptions of the proxy, and the HTTP status each one maps to.

::

    LMCacheDisaggError
    └── ProxyError
        ├── ClientRequestError          bad client input           -> its 4xx status
        ├── NoWorkerAvailable           no healthy worker of a role -> 503
        ├── UpstreamStatusError         worker answered an error   -> 4xx passed through, 5xx -> 502
        └── UpstreamError               transport-level failure of one upstream hop
            ├── UpstreamUnavailable     refused / reset / closed   -> 502
            └── UpstreamTimeout         a hop's deadline passed    -> 504

aiohttp and OS errors are translated in :mod:`lmcache_disagg.proxy.upstream` with ``from exc``.
"""

from __future__ import annotations

from lmcache_disagg.errors import LMCacheDisaggError

__all__ = [
    "ClientRequestError",
    "NoWorkerAvailable",
    "ProxyError",
    "UpstreamError",
    "UpstreamStatusError",
    "UpstreamTimeout",
    "UpstreamUnavailable",
]


class ProxyError(LMCacheDisaggError):
    """Base of every proxy error. ``status`` is the HTTP status the client gets."""

    status = 500
    error_type = "internal_error"

    @property
    def public_message(self) -> str:
        """The message a client may see: never a worker address or an exception repr."""
        return str(self)


class ClientRequestError(ProxyError):
    """The client's request is invalid; ``status`` is a 4xx, ``param`` names the bad field."""

    error_type = "invalid_request_error"

    def __init__(self, message: str, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.param = param


class NoWorkerAvailable(ProxyError):
    """No healthy worker of the needed role (all down, unhealthy or breaker-open)."""

    status = 503
    error_type = "service_unavailable"


class UpstreamStatusError(ProxyError):
    """A worker answered with an HTTP error. 4xx bodies go back to the client verbatim."""

    error_type = "upstream_error"

    def __init__(self, worker: str, upstream_status: int, body: bytes) -> None:
        super().__init__(f"worker {worker} answered HTTP {upstream_status}")
        self.worker = worker
        self.upstream_status = upstream_status
        self.body = body
        self.status = upstream_status if 400 <= upstream_status < 500 else 502

    @property
    def public_message(self) -> str:
        return f"a worker answered HTTP {self.upstream_status}"

    @property
    def retryable(self) -> bool:
        """Anything but a 4xx may succeed on another worker; 408 and 429 too. Other 4xx are the
        client's fault. (Only a 200 is a success: 1xx, other 2xx and 3xx answers are failures.)"""
        return not 400 <= self.upstream_status < 500 or self.upstream_status in (408, 429)


class UpstreamError(ProxyError):
    """A transport failure talking to ``worker`` (never a well-formed HTTP error answer)."""

    status = 502
    error_type = "upstream_error"

    public = "a worker failed"

    def __init__(self, worker: str, message: str) -> None:
        super().__init__(f"worker {worker}: {message}")
        self.worker = worker

    @property
    def public_message(self) -> str:
        return self.public


class UpstreamUnavailable(UpstreamError):
    """Connection refused, reset or closed early."""

    status = 502
    public = "a worker closed or refused the connection"


class UpstreamTimeout(UpstreamError):
    """Connect, prefill, first-byte or idle-stream deadline passed."""

    status = 504
    error_type = "timeout"
    public = "a worker did not answer in time"
