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
==========================================  =======================================================

Payload keys: ``c:<name>[:<reason>]`` counters (summed), ``g:<name>`` gauges (summed over ranks;
the frontend sets the last value) and ``h:<name>`` histogram observations (concatenated).
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
)
REASON_COUNTERS = ("fallbacks", "push_failures")
GAUGES = (
    "pool_pages_used",
    "pool_pages_total",
    "send_pages_used",
    "pending_loads",
    "pending_pushes",
)
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
            if key.startswith("h:"):
                self.data[key] = list(self.data.get(key, [])) + list(value)
            else:
                self.data[key] = self.data.get(key, 0) + value
        return self

    def reduce(self) -> dict[str, int | float]:
        out: dict[str, int | float] = {}
        for key, value in self.data.items():
            if key.startswith("h:"):
                if value:
                    out[f"{key[2:]}_avg"] = round(sum(value) / len(value), 4)
            else:
                out[key[2:]] = value
        return out

    def is_empty(self) -> bool:
        return not self.data


class StatsRecorder:
    """Worker-side accumulator. Thread-safe (the transfer threads never call it, but be safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._data: dict[str, Any] = {}
        self._gauges: dict[str, int] = {}
        self._reported_gauges: dict[str, int] = {}

    def count(self, name: str, value: int | float = 1, reason: str | None = None) -> None:
        key = f"c:{name}" if reason is None else f"c:{name}:{reason}"
        with self._lock:
            self._data[key] = self._data.get(key, 0) + value

    def observe(self, name: str, value: float) -> None:
        with self._lock:
            self._data.setdefault(f"h:{name}", []).append(value)

    def gauge(self, name: str, value: int) -> None:
        with self._lock:
            self._gauges[name] = value

    def take(self) -> LMCacheDisaggStats | None:
        """What changed since the last call (None when nothing did)."""
        with self._lock:
            changed = self._gauges != self._reported_gauges
            if not self._data and not changed:
                return None
            data = self._data
            self._data = {}
            if changed or data:
                for name, value in self._gauges.items():
                    data[f"g:{name}"] = value
                self._reported_gauges = dict(self._gauges)
        return LMCacheDisaggStats(data=data)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return copy.deepcopy({**self._data, **{f"g:{k}": v for k, v in self._gauges.items()}})


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

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        labels = self.per_engine_labelvalues.get(engine_idx)
        if labels is None:
            return
        for key, value in transfer_stats_data.items():
            kind, _, rest = key.partition(":")
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
