"""A lean closed-loop HTTP load generator (run in its own process by ``bench.py`` and the tests).

``python -m lmcache_disagg.bench.loadgen --target HOST:PORT --path /v1/completions --body JSON
--concurrency 32 --requests N [--warmup W]`` prints one JSON object: req/s, latency percentiles,
status counts, and for SSE answers how many ended without ``[DONE]`` or carried an error event.

Each virtual client owns one keep-alive connection (raw asyncio protocol + httptools response
parser), so the generator costs far less CPU per request than the proxies it measures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections import Counter
from typing import Any, cast

import httptools
import orjson

from lmcache_disagg.config import split_host_port

__all__ = ["LoadResult", "main", "run_load"]

LoadResult = dict[str, Any]


class _Conn(asyncio.Protocol):
    """One keep-alive client connection; one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.body: list[bytes] = []
        self.closed = False
        self.keep_alive = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionResetError("connection lost"))

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_exception(exc)
            if self.transport is not None:
                self.transport.close()

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result((self.parser.get_status_code(), b"".join(self.body)))

    async def request(self, raw: bytes, timeout: float) -> tuple[int, bytes]:
        assert self.transport is not None
        self.body = []
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        async with asyncio.timeout(timeout):
            return await self.waiter


async def _client(
    host: str,
    port: int,
    raw: bytes,
    stop_at: list[int],
    counter: list[int],
    warmup: int,
    lat: list[float],
    statuses: Counter[int],
    problems: Counter[str],
    timeout: float,
    mark: list[float],
) -> None:
    loop = asyncio.get_running_loop()
    conn: _Conn | None = None
    while True:
        index = counter[0]
        if index >= stop_at[0]:
            break
        counter[0] = index + 1
        if conn is None or conn.closed or not conn.keep_alive:
            if conn is not None and conn.transport is not None:
                conn.transport.close()
            _, conn = await loop.create_connection(_Conn, host, port)
        t0 = time.perf_counter()
        if index == warmup:
            mark.append(t0)
        try:
            status, body = await conn.request(raw, timeout)
        except (OSError, TimeoutError, httptools.HttpParserError) as exc:
            problems[f"transport:{type(exc).__name__}"] += 1
            if conn.transport is not None:
                conn.transport.close()
            conn = None
            continue
        elapsed = time.perf_counter() - t0
        if index >= warmup:
            lat.append(elapsed)
            statuses[status] += 1
            if status == 200 and body.startswith(b"data:"):
                if not body.endswith(b"data: [DONE]\n\n"):
                    problems["sse_without_done"] += 1
                if b'"error"' in body:
                    problems["sse_error_event"] += 1
    if conn is not None and conn.transport is not None:
        conn.transport.close()


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


async def run_load(
    target: str,
    path: str,
    body: bytes,
    concurrency: int,
    requests: int,
    warmup: int = 0,
    timeout: float = 60.0,
    headers: dict[str, str] | None = None,
) -> LoadResult:
    """Drive ``requests`` (+ ``warmup``) requests with ``concurrency`` closed-loop clients."""
    host, port = split_host_port(target)
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    raw = (
        f"POST {path} HTTP/1.1\r\nhost: {target}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body
    lat: list[float] = []
    statuses: Counter[int] = Counter()
    problems: Counter[str] = Counter()
    counter = [0]
    stop_at = [requests + warmup]
    mark: list[float] = []
    t_start = time.perf_counter()
    await asyncio.gather(
        *(
            _client(
                host,
                int(port),
                raw,
                stop_at,
                counter,
                warmup,
                lat,
                statuses,
                problems,
                timeout,
                mark,
            )
            for _ in range(concurrency)
        )
    )
    t_end = time.perf_counter()
    wall = t_end - t_start
    measured = len(lat)
    span = t_end - (mark[0] if mark else t_start)
    return {
        "requests": measured,
        "req_per_s": measured / span if measured and span > 0 else 0.0,
        "p50_ms": _pct(lat, 0.50) * 1000.0,
        "p99_ms": _pct(lat, 0.99) * 1000.0,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "problems": dict(problems),
        "wall_s": wall,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="closed-loop HTTP load generator")
    parser.add_argument("--target", required=True, help="host:port")
    parser.add_argument("--path", default="/v1/completions")
    parser.add_argument("--body", required=True, help="JSON request body")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--header", action="append", default=[], help="Name: value")
    args = parser.parse_args(argv)
    headers = dict(h.split(":", 1) for h in args.header)
    headers = {k.strip(): v.strip() for k, v in headers.items()}
    import uvloop

    result = uvloop.run(
        run_load(
            args.target,
            args.path,
            args.body.encode(),
            args.concurrency,
            args.requests,
            args.warmup,
            args.timeout,
            headers,
        )
    )
    with contextlib.suppress(BrokenPipeError):
        sys.stdout.write(orjson.dumps(result).decode() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
