"""The metrics seam of the chunk store.

The store reports through a :class:`StoreMetrics`; the connector adapts it to its Prometheus
recorder, whose series are ``lmcache_disagg_cache_<name>{tier=...}``. Names in use:

* counters: ``hits``, ``misses``, ``hit_tokens``, ``read_bytes``, ``written_bytes``,
  ``evictions``, ``promotions``, ``faults`` (with ``reason``: ``checksum``, ``truncated``,
  ``foreign``, ``disk_full``, ``io_error``, ``timeout``, ``unavailable``, ``bad_size``,
  ``queue_full``, ``lease_expired``, ``no_room``, ``missing``);
* histograms: ``store_seconds``, ``load_seconds``;
* gauges: ``used_bytes``, ``capacity_bytes``, ``chunks``, ``pinned_chunks``.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Protocol

from lmcache_disagg.transfer.store.tier import Tier

__all__ = [
    "COUNTERS",
    "GAUGES",
    "HISTOGRAMS",
    "MemoryStoreMetrics",
    "NullStoreMetrics",
    "StoreMetrics",
]

COUNTERS = (
    "hits",
    "misses",
    "hit_tokens",
    "read_bytes",
    "written_bytes",
    "evictions",
    "promotions",
    "faults",
)
HISTOGRAMS = ("store_seconds", "load_seconds")
GAUGES = ("used_bytes", "capacity_bytes", "chunks", "pinned_chunks")


class StoreMetrics(Protocol):
    """What the store reports. Implementations must be thread-safe and must not block."""

    def count(self, name: str, tier: Tier, value: float = 1, reason: str | None = None) -> None:
        """Add ``value`` to counter ``name`` (``reason`` only for ``faults``)."""

    def observe(self, name: str, tier: Tier, seconds: float) -> None:
        """Record one latency sample of histogram ``name``."""

    def gauge(self, name: str, tier: Tier, value: float) -> None:
        """Set gauge ``name``."""


class NullStoreMetrics:
    """Discards everything."""

    def count(self, name: str, tier: Tier, value: float = 1, reason: str | None = None) -> None:
        return None

    def observe(self, name: str, tier: Tier, seconds: float) -> None:
        return None

    def gauge(self, name: str, tier: Tier, value: float) -> None:
        return None


class MemoryStoreMetrics:
    """Keeps every value in memory (tests, ``bench cache``). Thread-safe.

    ``counts[(name, tier, reason)]``, ``samples[(name, tier)]`` (list of seconds),
    ``gauges[(name, tier)]``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: defaultdict[tuple[str, Tier, str | None], float] = defaultdict(float)
        self.samples: defaultdict[tuple[str, Tier], list[float]] = defaultdict(list)
        self.gauges: dict[tuple[str, Tier], float] = {}

    def count(self, name: str, tier: Tier, value: float = 1, reason: str | None = None) -> None:
        with self._lock:
            self.counts[(name, tier, reason)] += value

    def observe(self, name: str, tier: Tier, seconds: float) -> None:
        with self._lock:
            self.samples[(name, tier)].append(seconds)

    def gauge(self, name: str, tier: Tier, value: float) -> None:
        with self._lock:
            self.gauges[(name, tier)] = value

    def total(self, name: str, tier: Tier | None = None, reason: str | None = None) -> float:
        """Sum of counter ``name`` over the tiers/reasons not pinned by the arguments."""
        with self._lock:
            return sum(
                value
                for (n, t, r), value in self.counts.items()
                if n == name and (tier is None or t == tier) and (reason is None or r == reason)
            )
