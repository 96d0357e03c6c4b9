"""The chunk store's ``StoreMetrics`` protocol, fed into the worker's :class:`StatsRecorder`.

The store (``lmcache_disagg.transfer.store``) knows nothing of vLLM; it reports per-tier events
through this adapter, and vLLM's connector-metrics route carries them to the frontend, where
:class:`~lmcache_disagg.connector.stats.LMCacheDisaggPromMetrics` exposes them as
``lmcache_disagg_cache_<name>{tier=...}`` (``reason`` too for faults). Called from the store's
threads; the recorder is thread-safe.
"""

from __future__ import annotations

from enum import Enum

from lmcache_disagg.connector.stats import StatsRecorder

__all__ = ["StoreStatsAdapter"]


def _tier(tier: Enum | str) -> str:
    return str(tier.value) if isinstance(tier, Enum) else str(tier)


class StoreStatsAdapter:
    """Implements ``StoreMetrics`` (count / observe / gauge, each per tier)."""

    def __init__(self, stats: StatsRecorder) -> None:
        self._stats = stats

    def count(
        self, name: str, tier: Enum | str, value: float = 1, reason: str | None = None
    ) -> None:
        self._stats.count_tier(name, _tier(tier), value, reason)

    def observe(self, name: str, tier: Enum | str, seconds: float) -> None:
        self._stats.observe_tier(name, _tier(tier), seconds)

    def gauge(self, name: str, tier: Enum | str, value: float) -> None:
        self._stats.gauge_tier(name, _tier(tier), value)
