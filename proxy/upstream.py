"""The one shared upstream HTTP client of a proxy process: one tuned :mod:`aiohttp` session.

Contract:

* :class:`UpstreamClient` is created once per process; ``start()``/``close()`` bracket its use
  (the app's lifespan). There is one ``ClientSession`` and one ``TCPConnector`` per process and no
  per-request session, timeout or URL object: URLs are cached per worker and path, and deadlines
  are scoped with ``asyncio.timeout`` around each call.
* All calls run in the event loop. Transport failures raise
  :class:`~lmcache_disagg.proxy.errors.UpstreamUnavailable`, deadlines raise ``UpstreamTimeout``
  (both chained ``from`` the aiohttp/OS error); HTTP answers of any status are returned as such.
* A response that was not read to its end (error, deadline, cancellation) closes its connection,
  so cancelling the caller aborts the upstream request at once (the client-disconnect path).
* A request is retried on a fresh connection only when the connection could not be opened
  (nothing was sent). After a failure on a reused connection the worker may already have the POST,
  so it is never resent here; the PD flow decides what to do with the failure.
* Pooled connections are closed after :data:`IDLE_TIMEOUT` seconds idle, below vLLM's (uvicorn's)
  5 s keep-alive, so a worker never closes one under a request being sent. A pooled connection
  that received bytes while idle is closed instead of being handed out (see
  :class:`_CheckedConnector`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import aiohttp
from aiohttp.client_exceptions import ClientConnectorError
from yarl import URL

from lmcache_disagg.proxy.errors import UpstreamTimeout, UpstreamUnavailable
from lmcache_disagg.proxy.settings import Timeouts
from lmcache_disagg.proxy.workers import Worker

__all__ = ["IDLE_TIMEOUT", "UpstreamClient", "UpstreamStream"]

IDLE_TIMEOUT = 3.0
"""Seconds a pooled upstream connection may stay idle (vLLM's server closes them after 5 s)."""
_MAX_HEADER_FIELD = 8190
_MAX_URLS = 4096
_CONNECT_ATTEMPTS = 2


class _CheckedConnector(aiohttp.TCPConnector):
    """A TCPConnector that never hands out a pooled connection that got bytes while idle.

    aiohttp reuses any idle connection that is still open. Bytes a worker sent on it while it was
    idle (a stray or second response) would be parsed as the answer to the next request; such a
    connection is closed and the next one (or a new one) is taken.
    """

    async def _get(self, key: Any, traces: Any) -> Any:  # the one override point aiohttp has
        while True:
            conn = await super()._get(key, traces)
            if conn is None or conn.protocol is None or not conn.protocol.should_close:
                return conn
            conn.close()


class UpstreamStream:
    """An upstream answer whose body is read chunk by chunk. Always call :meth:`aclose`."""

    __slots__ = ("_resp", "_worker", "content_type", "status")

    def __init__(self, resp: aiohttp.ClientResponse, worker: Worker) -> None:
        self._resp = resp
        self._worker = worker
        self.status = resp.status
        self.content_type = resp.headers.get("content-type", "application/json")

    @property
    def at_eof(self) -> bool:
        """True once the whole answer has arrived and been read (no further read needed)."""
        return self._resp.content.at_eof()

    async def read(self, timeout: float | None) -> bytes:
        """The next body bytes available (b"" at the end). Raises UpstreamTimeout/Unavailable."""
        try:
            async with asyncio.timeout(timeout):
                return await self._resp.content.readany()
        except TimeoutError as exc:
            raise UpstreamTimeout(self._worker.http, "no data within the deadline") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamUnavailable(self._worker.http, f"stream broken: {exc!r}") from exc

    async def read_all(self, timeout: float | None, limit: int) -> bytes:
        """The whole remaining body, within ``timeout`` seconds (None: the caller's deadline)
        and ``limit`` bytes."""
        try:
            if timeout is None:
                return await self._read_all(limit)
            async with asyncio.timeout(timeout):
                return await self._read_all(limit)
        except TimeoutError as exc:
            raise UpstreamTimeout(self._worker.http, "body not complete in time") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamUnavailable(self._worker.http, f"body broken: {exc!r}") from exc

    async def _read_all(self, limit: int) -> bytes:
        content = self._resp.content
        parts: list[bytes] = []
        size = 0
        while True:
            data = await content.readany()
            if not data:
                return parts[0] if len(parts) == 1 else b"".join(parts)
            parts.append(data)
            size += len(data)
            if size > limit:
                raise UpstreamUnavailable(self._worker.http, "response body too large")

    def aclose(self) -> None:
        """Return the connection to the pool if the answer was read to its end, else close it."""
        resp = self._resp
        if resp.content.at_eof():
            resp.release()
        else:
            resp.close()


class UpstreamClient:
    """The process's aiohttp session to all workers."""

    def __init__(
        self,
        timeouts: Timeouts,
        pool_size: int,
        max_response: int,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self._timeouts = timeouts
        self._pool_size = pool_size
        self.max_response = max_response
        self._headers = dict(headers or {})
        self._session: aiohttp.ClientSession | None = None
        self._urls: dict[tuple[str, str], URL] = {}

    async def start(self) -> None:
        connector = _CheckedConnector(
            limit=self._pool_size,
            limit_per_host=0,
            keepalive_timeout=IDLE_TIMEOUT,
            ttl_dns_cache=None,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers=self._headers,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, connect=self._timeouts.connect),
            max_field_size=_MAX_HEADER_FIELD,
            raise_for_status=False,
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _url(self, worker: Worker, path: str) -> URL:
        key = (worker.http, path)
        url = self._urls.get(key)
        if url is None:
            url = URL(worker.base_url + path)
            if len(self._urls) < _MAX_URLS:
                self._urls[key] = url
        return url

    async def open(
        self,
        worker: Worker,
        method: str,
        path: str,
        body: bytes | None,
        headers: Mapping[str, str] | None,
        timeout: float | None,
    ) -> UpstreamStream:
        """Send a request; wait at most ``timeout`` s for the status line and headers."""
        session = self._session
        assert session is not None, "UpstreamClient.start() was not called"
        url = self._url(worker, path)
        try:
            if timeout is None:
                resp = await self._send(session, method, url, body, headers)
            else:
                async with asyncio.timeout(timeout):
                    resp = await self._send(session, method, url, body, headers)
        except TimeoutError as exc:
            raise UpstreamTimeout(worker.http, "no response within the deadline") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamUnavailable(worker.http, f"request failed: {exc!r}") from exc
        return UpstreamStream(resp, worker)

    @staticmethod
    async def _send(
        session: aiohttp.ClientSession,
        method: str,
        url: URL,
        body: bytes | None,
        headers: Mapping[str, str] | None,
    ) -> aiohttp.ClientResponse:
        for attempt in range(1, _CONNECT_ATTEMPTS + 1):
            try:
                return await session.request(
                    method, url, data=body, headers=headers, allow_redirects=False
                )
            except ClientConnectorError:
                # Could not connect: nothing was sent, so one more try is safe.
                if attempt == _CONNECT_ATTEMPTS:
                    raise
        raise AssertionError("unreachable")

    async def fetch(
        self,
        worker: Worker,
        method: str,
        path: str,
        body: bytes | None,
        headers: Mapping[str, str] | None,
        timeout: float | None,
    ) -> tuple[int, bytes]:
        """Send a request and read the whole answer, all within ``timeout`` seconds."""
        try:
            async with asyncio.timeout(timeout):  # one deadline for the whole exchange
                stream = await self.open(worker, method, path, body, headers, None)
                try:
                    data = await stream.read_all(None, self.max_response)
                finally:
                    stream.aclose()
        except TimeoutError as exc:
            raise UpstreamTimeout(worker.http, "no complete answer within the deadline") from exc
        return stream.status, data
