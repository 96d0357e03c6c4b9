"""Connector metrics, carried on vLLM's own route to the frontend's ``/metrics``.

Each worker keeps a :class:`StatsRecorder`. Every engine step vLLM calls
``get_kv_connector_stats()``, which hands over a :class:`LMCacheDisaggStats` with what changed since
the last call; vLLM aggregates the TP ranks' objects, ships ``to_dict()`` to the API server process
and calls :class:`LMCacheDisaggPromMetrics.observe` there, which updates the Prometheus series:

==========================================  =======================================================
``lmcache_disagg_tokens_loaded_total``      prompt tokens D loaded from P's push (not computed)
``lmcache_disagg_tokens_recomputed_total``  tokens P pushed (or was to push) that D recomputed
``lmcache_disagg_tokens_pushed_total``      tokens P gathered and handed to the transfer layer
``lmcache_disagg_bytes_{sent,received}``    chunk payload bytes
``lmcache_disagg_fallbacks_total{reason}``  D loads that fell back to recompute, by reason
``lmcache_disagg_push_failures_total{..}``  P pushes that failed, by reason
``lmcache_disagg_load_wait_seconds``        D: from load registration to KV in place (histogram)
``lmcache_disagg_transfer_gbps``            P: payload GB/s per finished push (histogram)
``lmcache_disagg_pool_pages_used``          D receive-pool pages held (gauge; drains to 0)
``lmcache_disagg_send_pages_used``          P staging pages in flight (gauge; drains to 0)
``lmcache_disagg_pending_loads``            D loads not yet settled (gauge)
``lmcache_disagg_pending_pushes``           P pushes not yet settled, incl. held blocks (gauge)
``lmcache_disagg_cache_tokens_loaded_total`` prompt tokens loaded from the chunk store (any tier)
``lmcache_disagg_cache_tokens_stored_total`` prompt tokens gathered and committed to the store
``lmcache_disagg_cache_load_failures_total`` cache loads that fell back to recompute, by reason
``lmcache_disagg_cache_forward_seconds_total`` engine-thread seconds spent storing after forwards
``lmcache_disagg_cache_leases``             store leases held (gauge; drains to 0)
``lmcache_disagg_cache_pending_loads``      cache loads not yet settled (gauge)
``lmcache_disagg_cache_<name>{tier}``       the chunk store's own series (see ``STORE_SERIES``):
                                            hits, misses, hit tokens, bytes, evictions, promotions,
                                            faults{reason}, latency histograms, occupancy gauges
==========================================  =======================================================

Payload keys: ``c:<name>[:<reason>]`` counters (summed), ``g:<name>`` gauges (summed over ranks;
the frontend sets the last value) and ``h:<name>`` histogram observations (concatenated). The
store's per-tier series use ``tc:<name>:<tier>:<reason>``, ``tg:<name>:<tier>`` and
``th:<name>:<tier>`` the same way.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass
from typing import Any

from vllm.config import VllmConfig
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
    PromMetric,
    PromMetricT,
)

from lmcache_disagg.connector.info import register_layout_info

__all__ = ["COUNTERS", "GAUGES", "LMCacheDisaggPromMetrics", "LMCacheDisaggStats", "StatsRecorder"]

PREFIX = "lmcache_disagg_"
COUNTERS = (
    "tokens_loaded",
    "tokens_recomputed",
    "tokens_pushed",
    "bytes_sent",
    "bytes_received",
    "loads",
    "pushes",
    "cache_tokens_loaded",
    "cache_tokens_stored",
    "cache_loads",
    "cache_lookups",
    "cache_forward_seconds",
)
REASON_COUNTERS = ("fallbacks", "push_failures", "cache_load_failures", "cache_store_skipped")
GAUGES = (
    "pool_pages_used",
    "pool_pages_total",
    "send_pages_used",
    "pending_loads",
    "pending_pushes",
    "cache_leases",
    "cache_pending_loads",
)
CACHE_PREFIX = PREFIX + "cache_"
STORE_COUNTERS = (
    "hits",
    "misses",
    "hit_tokens",
    "read_bytes",
    "written_bytes",
    "evictions",
    "promotions",
)
STORE_REASON_COUNTERS = ("faults",)
STORE_GAUGES = ("used_bytes", "capacity_bytes", "chunks", "pinned_chunks")
STORE_HISTOGRAMS = {
    "store_seconds": (0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0),
    "load_seconds": (0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0),
}
STORE_SERIES = (*STORE_COUNTERS, *STORE_REASON_COUNTERS, *STORE_GAUGES, *STORE_HISTOGRAMS)
HISTOGRAMS = {
    "load_wait_seconds": (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0),
    "transfer_gbps": (0.01, 0.05, 0.1, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 64.0),
}


@dataclass
class LMCacheDisaggStats(KVConnectorStats):
    """One interval's worth of connector observations (a plain, serializable dict)."""

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for key, value in other.data.items():
            if key.startswith(("h:", "th:")):
                self.data[key] = list(self.data.get(key, [])) + list(value)
            else:
                self.data[key] = self.data.get(key, 0) + value
        return self

    def reduce(self) -> dict[str, int | float]:
        out: dict[str, int | float] = {}
        for key, value in self.data.items():
            kind, _, rest = key.partition(":")
            if kind in ("h", "th"):
                if value:
                    out[f"{rest}_avg"] = round(sum(value) / len(value), 4)
            else:
                out[rest] = value
        return out

    def is_empty(self) -> bool:
        return not self.data


class StatsRecorder:
    """Worker-side accumulator. Thread-safe (the transfer threads never call it, but be safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._data: dict[str, Any] = {}
        self._gauges: dict[str, int | float] = {}
        self._reported_gauges: dict[str, int | float] = {}

    def count(self, name: str, value: int | float = 1, reason: str | None = None) -> None:
        key = f"c:{name}" if reason is None else f"c:{name}:{reason}"
        with self._lock:
            self._data[key] = self._data.get(key, 0) + value

    def observe(self, name: str, value: float) -> None:
        with self._lock:
            self._data.setdefault(f"h:{name}", []).append(value)

    def gauge(self, name: str, value: int) -> None:
        with self._lock:
            self._gauges[f"g:{name}"] = value

    def count_tier(
        self, name: str, tier: str, value: int | float = 1, reason: str | None = None
    ) -> None:
        """A chunk-store counter of one tier (``reason`` for faults)."""
        key = f"tc:{name}:{tier}:{reason or ''}"
        with self._lock:
            self._data[key] = self._data.get(key, 0) + value

    def observe_tier(self, name: str, tier: str, value: float) -> None:
        with self._lock:
            self._data.setdefault(f"th:{name}:{tier}", []).append(value)

    def gauge_tier(self, name: str, tier: str, value: int | float) -> None:
        with self._lock:
            self._gauges[f"tg:{name}:{tier}"] = value

    def take(self) -> LMCacheDisaggStats | None:
        """What changed since the last call (None when nothing did)."""
        with self._lock:
            changed = self._gauges != self._reported_gauges
            if not self._data and not changed:
                return None
            data = self._data
            self._data = {}
            if changed or data:
                for key, value in self._gauges.items():
                    data[key] = value
                self._reported_gauges = dict(self._gauges)
        return LMCacheDisaggStats(data=data)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return copy.deepcopy({**self._data, **self._gauges})


class LMCacheDisaggPromMetrics(KVConnectorPromMetrics):
    """Registers the series above in the API server process and feeds them from the payloads."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        metric_types: dict[type[PromMetric], type[PromMetricT]],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        # vLLM's metric classes (prometheus_client's or Ray's wrappers) share one call shape.
        counter_cls: Any = self._counter_cls
        gauge_cls: Any = self._gauge_cls
        histogram_cls: Any = self._histogram_cls
        # From start-up on, /metrics shows our role and layout (``lmcache-disagg check`` reads it).
        self._layout_info = register_layout_info(
            gauge_cls, vllm_config, labelnames, per_engine_labelvalues
        )
        self._counters: dict[str, Any] = {
            name: counter_cls(
                name=PREFIX + name,
                documentation=f"lmcache-disagg connector: {name.replace('_', ' ')}",
                labelnames=labelnames,
            )
            for name in COUNTERS
        }
        self._reason_counters: dict[str, Any] = {
            name: counter_cls(
                name=PREFIX + name,
                documentation=f"lmcache-disagg connector: {name.replace('_', ' ')} by reason",
                labelnames=[*labelnames, "reason"],
            )
            for name in REASON_COUNTERS
        }
        self._gauges: dict[str, Any] = {
            name: gauge_cls(
                name=PREFIX + name,
                documentation=f"lmcache-disagg connector: {name.replace('_', ' ')}",
                labelnames=labelnames,
                multiprocess_mode="mostrecent",
            )
            for name in GAUGES
        }
        self._histograms: dict[str, Any] = {
            name: histogram_cls(
                name=PREFIX + name,
                documentation=f"lmcache-disagg connector: {name.replace('_', ' ')}",
                labelnames=labelnames,
                buckets=list(buckets),
            )
            for name, buckets in HISTOGRAMS.items()
        }
        tier_labels = [*labelnames, "tier"]
        self._store_counters: dict[str, Any] = {
            name: counter_cls(
                name=CACHE_PREFIX + name,
                documentation=f"lmcache-disagg chunk store: {name.replace('_', ' ')} per tier",
                labelnames=tier_labels,
            )
            for name in STORE_COUNTERS
        }
        self._store_reason_counters: dict[str, Any] = {
            name: counter_cls(
                name=CACHE_PREFIX + name,
                documentation=f"lmcache-disagg chunk store: {name} per tier and reason",
                labelnames=[*tier_labels, "reason"],
            )
            for name in STORE_REASON_COUNTERS
        }
        self._store_gauges: dict[str, Any] = {
            name: gauge_cls(
                name=CACHE_PREFIX + name,
                documentation=f"lmcache-disagg chunk store: {name.replace('_', ' ')} per tier",
                labelnames=tier_labels,
                multiprocess_mode="mostrecent",
            )
            for name in STORE_GAUGES
        }
        self._store_histograms: dict[str, Any] = {
            name: histogram_cls(
                name=CACHE_PREFIX + name,
                documentation=f"lmcache-disagg chunk store: {name.replace('_', ' ')} per tier",
                labelnames=tier_labels,
                buckets=list(buckets),
            )
            for name, buckets in STORE_HISTOGRAMS.items()
        }

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        labels = self.per_engine_labelvalues.get(engine_idx)
        if labels is None:
            return
        for key, value in transfer_stats_data.items():
            kind, _, rest = key.partition(":")
            if kind in ("tc", "tg", "th"):
                self._observe_store(kind, rest, value, labels)
                continue
            name, _, reason = rest.partition(":")
            if kind == "c" and name in self._counters and not reason:
                self._counters[name].labels(*labels).inc(value)
            elif kind == "c" and name in self._reason_counters and reason:
                self._reason_counters[name].labels(*labels, reason).inc(value)
            elif kind == "g" and name in self._gauges:
                self._gauges[name].labels(*labels).set(value)
            elif kind == "h" and name in self._histograms:
                hist = self._histograms[name].labels(*labels)
                for sample in value:
                    hist.observe(sample)

    def _observe_store(self, kind: str, rest: str, value: Any, labels: list[object]) -> None:
        name, _, tail = rest.partition(":")
        tier, _, reason = tail.partition(":")
        if not tier:
            return
        if kind == "tc" and name in self._store_counters:
            self._store_counters[name].labels(*labels, tier).inc(value)
        elif kind == "tc" and name in self._store_reason_counters:
            self._store_reason_counters[name].labels(*labels, tier, reason or "unknown").inc(value)
        elif kind == "tg" and name in self._store_gauges:
            self._store_gauges[name].labels(*labels, tier).set(value)
        elif kind == "th" and name in self._store_histograms:
            hist = self._store_histograms[name].labels(*labels, tier)
            for sample in value:
                hist.observe(sample)
