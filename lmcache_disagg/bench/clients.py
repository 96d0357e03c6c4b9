"""Upstream HTTP client comparison: ``lmcache-disagg bench proxy --clients``.

Drives one stub decode worker with 32 closed-loop tasks per client library, in one process, and
reports req/s: plain aiohttp (one shared session, defaults), httpx (one shared AsyncClient) and
the proxy's :class:`~lmcache_disagg.proxy.upstream.UpstreamClient` (a tuned aiohttp session), so
the cost of the proxy's own layer over aiohttp shows. httpx is optional; it is skipped if missing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from lmcache_disagg.proxy.settings import Timeouts, WorkerSpec
from lmcache_disagg.proxy.upstream import UpstreamClient
from lmcache_disagg.proxy.workers import WorkerPool

__all__ = ["compare_clients"]

_BODY = b'{"model":"stub-model","prompt":"a b c d","max_tokens":16}'


async def _drive(call: Callable[[], Awaitable[int]], requests: int, concurrency: int) -> float:
    remaining = [requests]

    async def one() -> None:
        while remaining[0] > 0:
            remaining[0] -= 1
            status = await call()
            if status != 200:
                raise RuntimeError(f"HTTP {status}")

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(concurrency)))
    return requests / (time.perf_counter() - t0)


async def _compare(addr: str, requests: int, concurrency: int) -> dict[str, Any]:
    import aiohttp

    url = f"http://{addr}/v1/completions"
    results: dict[str, Any] = {}

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def aio() -> int:
            async with session.post(
                url, data=_BODY, headers={"content-type": "application/json"}
            ) as r:
                await r.read()
                return r.status

        await _drive(aio, 200, concurrency)
        results["aiohttp"] = await _drive(aio, requests, concurrency)

    try:
        import httpx
    except ImportError:
        results["httpx"] = None
    else:
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(limits=limits) as hx:

            async def hxc() -> int:
                r = await hx.post(url, content=_BODY, headers={"content-type": "application/json"})
                return r.status_code

            await _drive(hxc, 200, concurrency)
            results["httpx"] = await _drive(hxc, requests, concurrency)

    client = UpstreamClient(
        Timeouts(),
        pool_size=concurrency,
        max_response=1 << 20,
        headers={"content-type": "application/json"},
    )
    await client.start()
    worker = WorkerPool(3, 5).add(WorkerSpec("decode", addr, addr))
    headers = None

    async def own() -> int:
        status, _ = await client.fetch(worker, "POST", "/v1/completions", _BODY, headers, 10.0)
        return status

    await _drive(own, 200, concurrency)
    results["lmcache_disagg UpstreamClient"] = await _drive(own, requests, concurrency)
    await client.close()
    return results


def compare_clients(addr: str, requests: int = 5000, concurrency: int = 32) -> dict[str, Any]:
    """req/s of each client against the stub at ``addr`` (each in the same process and loop)."""
    import uvloop

    return uvloop.run(_compare(addr, requests, concurrency))
