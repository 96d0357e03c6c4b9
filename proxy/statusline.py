"""The proxy's periodic status line, like vLLM's engine log line.

Every ``--status-interval`` seconds (0 = off) the proxy logs one line over the last interval::

    proxy: 12.4 req/s, 3 in flight, p50 TTFT 84 ms, 0 errors, KV 1.21 GB/s, cache hit 37.5% (10s)

* req/s, errors (answers that are not 2xx), in flight (requests holding a D) and the p50 of
  ``lmcache_proxy_decode_ttft_seconds`` come from the proxy's own ``/metrics`` text;
* KV GB/s (``lmcache_disagg_bytes_received_total`` on the D workers) and the cache hit rate
  (``lmcache_disagg_cache_hit_tokens_total`` over ``vllm:prompt_tokens_total``) come from one
  scrape of each worker's ``/metrics`` per interval; ``-`` when no worker exports them.

The arithmetic is pure (:func:`take_snapshot`, :func:`render`); :func:`run` is the asyncio loop.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import urllib.request
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

__all__ = ["Snapshot", "histogram_quantile", "render", "run", "take_snapshot"]

_log = logging.getLogger("lmcache_disagg.proxy.status")
SCRAPE_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class Snapshot:
    """Cumulative counters at ``at`` (monotonic seconds); a line is the difference of two."""

    at: float
    requests: float = 0.0
    errors: float = 0.0
    inflight: float = 0.0
    ttft_buckets: dict[float, float] = field(default_factory=dict)
    kv_bytes: float | None = None
    hit_tokens: float | None = None
    prompt_tokens: float | None = None


def _add(total: float | None, value: float) -> float:
    return value if total is None else total + value


def take_snapshot(proxy_text: str, worker_texts: Sequence[str], at: float) -> Snapshot:
    """Read the proxy's and the workers' Prometheus text expositions into one snapshot."""
    requests = errors = inflight = 0.0
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(proxy_text):
        for sample in family.samples:
            if sample.name == "lmcache_proxy_requests_total":
                requests += sample.value
                if not str(sample.labels.get("status", "")).startswith("2"):
                    errors += sample.value
            elif sample.name == "lmcache_proxy_worker_inflight":
                if sample.labels.get("role") == "decode":
                    inflight += sample.value
            elif sample.name == "lmcache_proxy_decode_ttft_seconds_bucket":
                bound = float(sample.labels["le"])
                buckets[bound] = buckets.get(bound, 0.0) + sample.value
    kv_bytes = hit_tokens = prompt_tokens = None
    for text in worker_texts:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "lmcache_disagg_bytes_received_total":
                    kv_bytes = _add(kv_bytes, sample.value)
                elif sample.name == "lmcache_disagg_cache_hit_tokens_total":
                    hit_tokens = _add(hit_tokens, sample.value)
                elif sample.name == "vllm:prompt_tokens_total":
                    prompt_tokens = _add(prompt_tokens, sample.value)
    return Snapshot(at, requests, errors, inflight, buckets, kv_bytes, hit_tokens, prompt_tokens)


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus' estimate of quantile ``q`` from cumulative ``{upper bound: count}`` buckets."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


def _delta(new: float | None, old: float | None) -> float | None:
    if new is None:
        return None
    return max(0.0, new - (old or 0.0))


def render(prev: Snapshot, cur: Snapshot) -> str:
    """The status line for the interval between two snapshots."""
    span = max(cur.at - prev.at, 1e-9)
    rate = max(0.0, cur.requests - prev.requests) / span
    errors = max(0.0, cur.errors - prev.errors)
    window = {b: max(0.0, n - prev.ttft_buckets.get(b, 0.0)) for b, n in cur.ttft_buckets.items()}
    p50 = histogram_quantile(0.5, window)
    ttft = "-" if p50 is None else f"{p50 * 1000:.0f} ms"
    kv = _delta(cur.kv_bytes, prev.kv_bytes)
    kv_text = "-" if kv is None else f"{kv / span / 1e9:.2f} GB/s"
    hits = _delta(cur.hit_tokens, prev.hit_tokens)
    prompts = _delta(cur.prompt_tokens, prev.prompt_tokens)
    hit_text = "-" if hits is None or not prompts else f"{100.0 * hits / prompts:.1f}%"
    return (
        f"proxy: {rate:.1f} req/s, {cur.inflight:.0f} in flight, p50 TTFT {ttft}, "
        f"{errors:.0f} errors, KV {kv_text}, cache hit {hit_text} ({span:.0f}s)"
    )


def _scrape(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S) as response:
            body: bytes = response.read(16 << 20)
            return body.decode("utf-8", "replace")
    except (OSError, ValueError):
        return ""  # a worker that does not answer adds nothing to this interval


async def run(
    interval: float,
    proxy_text: Callable[[], str],
    worker_urls: Callable[[], Sequence[str]],
    emit: Callable[[str], None] | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> None:
    """Log one line every ``interval`` seconds until cancelled (``interval <= 0``: return now).

    ``worker_urls`` gives the current workers' base URLs (``http://host:port``); each is scraped
    once per interval in a thread, with a deadline, so a slow worker never blocks the proxy.
    """
    if interval <= 0:
        return
    out = emit or _log.info

    async def snapshot() -> Snapshot:
        urls = [url.rstrip("/") + "/metrics" for url in worker_urls()]
        texts = await asyncio.gather(*(asyncio.to_thread(_scrape, url) for url in urls))
        return take_snapshot(proxy_text(), texts, time.monotonic())

    prev = await snapshot()
    while True:
        await sleep(interval)
        cur = await snapshot()
        out(render(prev, cur))
        prev = cur
