"""Prometheus metrics of the proxy (its own registry: no global state).

With ``--workers N`` the processes share one prometheus_client multiprocess directory
(``PROMETHEUS_MULTIPROC_DIR``, set by the parent before it spawns them), and ``/metrics`` on
whichever process the scrape lands merges all of them: counters and histograms summed, in-flight
gauges summed over live processes, breaker state the worst and health the least of any process.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

__all__ = ["ProxyMetrics"]

_TOKEN_BUCKETS = (0, 16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip


class ProxyMetrics:
    """All proxy metrics. Updated from the event loop; rendered by ``GET /metrics``."""

    def __init__(self, multiprocess_dir: str | None = None) -> None:
        self._multiprocess_dir = multiprocess_dir
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "lmcache_proxy_requests",
            "Requests by route and status",
            ["route", "status"],
            registry=r,
        )
        self.prefill_seconds = Histogram(
            "lmcache_proxy_prefill_seconds", "Prefill leg duration", buckets=_LATENCY_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.decode_ttft_seconds = Histogram(
            "lmcache_proxy_decode_ttft_seconds",
            "From sending D the request to its first body byte",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e_seconds = Histogram(
            "lmcache_proxy_e2e_seconds", "End-to-end request duration", buckets=_LATENCY_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.inflight = Gauge(
            "lmcache_proxy_worker_inflight", "In-flight requests per worker", ["role", "worker"],
            registry=r, multiprocess_mode="livesum",
        )  # fmt: skip
        self.retries = Counter(
            "lmcache_proxy_retries", "Retries by leg and reason", ["leg", "reason"], registry=r
        )
        self.fallbacks = Counter(
            "lmcache_proxy_fallbacks", "Local-prefill decisions by reason", ["reason"], registry=r
        )
        self.breaker_state = Gauge(
            "lmcache_proxy_breaker_state", "0 closed, 1 open, 2 half-open", ["role", "worker"],
            registry=r, multiprocess_mode="livemax",
        )  # fmt: skip
        self.worker_healthy = Gauge(
            "lmcache_proxy_worker_healthy", "1 if the last health check passed", ["role", "worker"],
            registry=r, multiprocess_mode="livemin",
        )  # fmt: skip
        self.internal_fields_dropped = Counter(
            "lmcache_proxy_client_internal_fields_dropped",
            "Client requests that carried internal fields (e.g. kv_transfer_params), dropped",
            ["field"],
            registry=r,
        )
        self.kv_probe_failures = Counter(
            "lmcache_proxy_kv_probe_failures",
            "Failed KV-path probes of decode workers by reason",
            ["endpoint", "reason"],
            registry=r,
        )
        # cache_aware routing (zero when another policy runs)
        self.kv_index_keys = Gauge(
            "lmcache_proxy_kv_index_keys", "Chunk keys in the proxy's KV index",
            registry=r, multiprocess_mode="livemax",
        )  # fmt: skip
        self.kv_worker_keys = Gauge(
            "lmcache_proxy_kv_index_worker_keys", "Chunk keys the index lists for each worker",
            ["worker"], registry=r, multiprocess_mode="livemax",
        )  # fmt: skip
        self.kv_sources = Gauge(
            "lmcache_proxy_kv_event_sources", "Workers' KV event streams by sync state",
            ["state"], registry=r, multiprocess_mode="livemax",
        )  # fmt: skip
        self.kv_events = Counter(
            "lmcache_proxy_kv_events_received", "KV events applied to the index", registry=r
        )
        self.kv_events_lost = Counter(
            "lmcache_proxy_kv_event_batches_lost",
            "KV event batches known lost (sequence gaps; each healed by a snapshot resync)",
            registry=r,
        )
        self.kv_resyncs = Counter(
            "lmcache_proxy_kv_resyncs", "Index resyncs from a worker's snapshot", registry=r
        )
        self.kv_invalid = Counter(
            "lmcache_proxy_kv_invalid_messages", "Malformed KV event messages dropped", registry=r
        )
        self.predicted_hit_tokens = Histogram(
            "lmcache_proxy_predicted_hit_tokens",
            "Per request: the chosen D's cached prefix according to the index",
            buckets=_TOKEN_BUCKETS, registry=r,
        )  # fmt: skip
        self.actual_hit_tokens = Histogram(
            "lmcache_proxy_actual_hit_tokens",
            "Per request: D's reported cached tokens minus those P pushed",
            buckets=_TOKEN_BUCKETS, registry=r,
        )  # fmt: skip
        self.cache_aware_decisions = Counter(
            "lmcache_proxy_cache_aware_decisions",
            "cache_aware prefill decisions by reason (cached_on_decode skips P)",
            ["reason"], registry=r,
        )  # fmt: skip
        self.rejected = Counter(
            "lmcache_proxy_rejected", "Requests refused before routing", ["reason"], registry=r
        )

    def render(self) -> bytes:
        if self._multiprocess_dir is None:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        MultiProcessCollector(merged, path=self._multiprocess_dir)
        return generate_latest(merged)
