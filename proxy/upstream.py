"""The one shared upstream HTTP client (aiohttp, one pool per proxy process).

Measured against httpx on this machine (see ``bench.py`` notes in the README section): aiohttp's
C parser and lighter request path won clearly, so it is the only client used. There is no
per-request session: :class:`UpstreamClient` is created once at start-up and closed at shutdown.

All methods are called from the event loop. Transport errors become
:class:`~lmcache_disagg.proxy.errors.UpstreamUnavailable` / ``UpstreamTimeout``; HTTP error answers
are returned as statuses (the caller decides retry vs. pass-through). Cancelling the caller closes
the upstream connection, which is how a client disconnect reaches the workers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import aiohttp
from lmcache_disagg.proxy.errors import UpstreamTimeout, UpstreamUnavailable
from lmcache_disagg.proxy.settings import Timeouts
from lmcache_disagg.proxy.workers import Worker

__all__ = ["UpstreamClient", "UpstreamStream"]


class UpstreamStream:
    """An open upstream response whose body is read chunk by chunk. Always ``aclose()`` it."""

    __slots__ = ("_resp", "_worker", "content_type", "status")

    def __init__(self, worker: Worker, resp: aiohttp.ClientResponse) -> None:
        self._worker = worker
        self._resp = resp
        self.status = resp.status
        self.content_type = resp.headers.get("Content-Type", "application/json")

    async def read(self, timeout: float | None) -> bytes:
        """The next body bytes (b"" at the end). Raises UpstreamTimeout/UpstreamUnavailable."""
        try:
            async with asyncio.timeout(timeout):
                return await self._resp.content.readany()
        except TimeoutError as exc:
            raise UpstreamTimeout(self._worker.http, "no data within the deadline") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamUnavailable(self._worker.http, f"stream broken: {exc!r}") from exc

    async def read_all(self, timeout: float | None, limit: int) -> bytes:
        """The whole remaining body, bounded by ``limit`` bytes and ``timeout`` seconds."""
        try:
            async with asyncio.timeout(timeout):
                data = await self._resp.content.read(limit + 1)
                while len(data) <= limit:
                    more = await self._resp.content.read(limit + 1 - len(data))
                    if not more:
                        break
                    data += more
        except TimeoutError as exc:
            raise UpstreamTimeout(
                self._worker.http, "body not received within the deadline"
            ) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamUnavailable(self._worker.http, f"body broken: {exc!r}") from exc
        if len(data) > limit:
            raise UpstreamUnavailable(self._worker.http, "response body too large")
        return data

    def aclose(self) -> None:
        """Release the connection: back to the pool if the body was consumed, else closed."""
        self._resp.release() if self._resp.content.at_eof() else self._resp.close()


class UpstreamClient:
    """One aiohttp session for all upstream calls of this process."""

    def __init__(self, timeouts: Timeouts, pool_size: int, max_response: int) -> None:
        self._timeouts = timeouts
        self._pool_size = pool_size
        self.max_response = max_response
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=self._pool_size,
            limit_per_host=0,
            keepalive_timeout=30.0,
            ttl_dns_cache=300,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._timeouts.connect),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def open(
        self,
        worker: Worker,
        method: str,
        path: str,
        body: bytes | None,
        headers: Mapping[str, str],
        timeout: float | None,
    ) -> UpstreamStream:
        """Send a request and wait (at most ``timeout`` s) for the status line and headers."""
        assert self._session is not None, "UpstreamClient.start() was not called"
        try:
            async with asyncio.timeout(timeout):
                resp = await self._session.request(
                    method, worker.base_url + path, data=body, headers=headers
                )
        except TimeoutError as exc:
            raise UpstreamTimeout(worker.http, "no response within the deadline") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamUnavailable(worker.http, f"request failed: {exc!r}") from exc
        return UpstreamStream(worker, resp)

    async def fetch(
        self,
        worker: Worker,
        method: str,
        path: str,
        body: bytes | None,
        headers: Mapping[str, str],
        timeout: float | None,
    ) -> tuple[int, bytes]:
        """Send a request and read the whole answer, all within ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        stream = await self.open(worker, method, path, body, headers, timeout)
        try:
            remaining = None if deadline is None else max(deadline - loop.time(), 0.0)
            data = await stream.read_all(remaining, self.max_response)
        finally:
            stream.aclose()
        return stream.status, data
