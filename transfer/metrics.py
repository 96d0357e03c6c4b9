"""Prometheus metrics of one sender or receiver instance (torch-free).

Each :class:`KVReceiver`/:class:`KVSender` owns one :class:`TransferMetrics`, registered in the
registry the caller passes (a private one by default), so two instances in one process (tests, the
bench) never collide and importing this module registers nothing.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["TransferMetrics"]

_PREFIX = "lmcache_disagg_transfer"


class TransferMetrics:
    """Counters/gauges for one endpoint. ``side`` is "send" or "recv" (a constant label)."""

    def __init__(self, side: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        labels = {"side": side}
        self.pool_pages_used = Gauge(
            f"{_PREFIX}_pool_pages_used",
            "Pool pages currently reserved or held",
            ["side"],
            registry=self.registry,
        ).labels(**labels)
        self.pool_pages_total = Gauge(
            f"{_PREFIX}_pool_pages_total", "Pool pages in total", ["side"], registry=self.registry
        ).labels(**labels)
        self.reserve_wait_seconds = Histogram(
            f"{_PREFIX}_reserve_wait_seconds",
            "Time a sender waited for a reservation (including retries on a full pool)",
            ["side"],
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0),
        ).labels(**labels)
        self.bytes_total = Counter(
            f"{_PREFIX}_bytes", "Chunk payload bytes moved", ["side"], registry=self.registry
        ).labels(**labels)
        self.chunks_total = Counter(
            f"{_PREFIX}_chunks", "Chunks moved", ["side"], registry=self.registry
        ).labels(**labels)
        self.transfers_total = Counter(
            f"{_PREFIX}_transfers",
            "Transfers by outcome",
            ["side", "outcome"],
            registry=self.registry,
        )
        self._failures = Counter(
            f"{_PREFIX}_failures",
            "Failures and refusals by reason",
            ["side", "reason"],
            registry=self.registry,
        )
        self._channel = Counter(
            f"{_PREFIX}_channel_selected",
            "Channel chosen per peer session",
            ["side", "channel"],
            registry=self.registry,
        )
        self._side = side

    def failure(self, reason: str) -> None:
        self._failures.labels(side=self._side, reason=reason).inc()

    def failures(self, reason: str) -> float:
        """Current count for ``reason`` (tests and the bench read it)."""
        value = self.registry.get_sample_value(
            f"{_PREFIX}_failures_total", {"side": self._side, "reason": reason}
        )
        return value or 0.0

    def transfer_outcome(self, outcome: str) -> None:
        self.transfers_total.labels(side=self._side, outcome=outcome).inc()

    def channel_selected(self, channel: str) -> None:
        self._channel.labels(side=self._side, channel=channel).inc()
