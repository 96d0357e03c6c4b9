"""The registry of P and D workers and their live state (health, breaker, load).

Everything here runs in the proxy's event loop thread; no locking is needed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Literal

from lmcache_disagg.config import split_host_port
from lmcache_disagg.proxy.breaker import CircuitBreaker
from lmcache_disagg.proxy.settings import WorkerSpec

__all__ = ["Role", "Worker", "WorkerPool"]

Role = Literal["prefill", "decode"]


class Worker:
    """One upstream worker. ``healthy`` is set by the health checker (False until first probe)."""

    __slots__ = (
        "address",
        "base_url",
        "breaker",
        "events",
        "healthy",
        "http",
        "inflight",
        "kv",
        "outstanding_tokens",
        "removed",
        "role",
    )

    def __init__(self, spec: WorkerSpec, breaker: CircuitBreaker) -> None:
        self.role: Role = spec.role
        self.http = spec.http
        self.kv = spec.kv
        self.events = spec.events
        self.base_url = spec.base_url
        self.address = split_host_port(spec.http)
        self.breaker = breaker
        self.healthy = False
        self.inflight = 0
        self.outstanding_tokens = 0
        self.removed = False

    def usable(self) -> bool:
        return self.healthy and not self.removed and self.breaker.available()

    def describe(self) -> dict[str, object]:
        return {
            "role": self.role,
            "http": self.http,
            "kv": self.kv if self.role == "decode" else None,
            "healthy": self.healthy,
            "breaker": ("closed", "open", "half_open")[self.breaker.state],
            "inflight": self.inflight,
            "outstanding_tokens": self.outstanding_tokens,
        }


class WorkerPool:
    """P and D workers by role. Adding/removing never disturbs requests already running."""

    def __init__(self, breaker_threshold: int, breaker_cooldown: float) -> None:
        self._threshold = breaker_threshold
        self._cooldown = breaker_cooldown
        self._workers: dict[Role, list[Worker]] = {"prefill": [], "decode": []}

    def add(self, spec: WorkerSpec) -> Worker:
        """Register ``spec``; an existing worker with the same role and address is returned."""
        for worker in self._workers[spec.role]:
            if worker.http == spec.http:
                return worker
        worker = Worker(spec, CircuitBreaker(self._threshold, self._cooldown))
        # Copy-on-write so that iterations in flight keep their snapshot.
        self._workers[spec.role] = [*self._workers[spec.role], worker]
        return worker

    def remove(self, role: Role, http: str) -> bool:
        kept = [w for w in self._workers[role] if w.http != http]
        if len(kept) == len(self._workers[role]):
            return False
        for worker in self._workers[role]:
            if worker.http == http:
                worker.removed = True
        self._workers[role] = kept
        return True

    def role(self, role: Role) -> list[Worker]:
        return self._workers[role]

    def __iter__(self) -> Iterator[Worker]:
        yield from self._workers["prefill"]
        yield from self._workers["decode"]

    def add_all(self, specs: Iterable[WorkerSpec]) -> None:
        for spec in specs:
            self.add(spec)

    def ready(self) -> bool:
        """At least one healthy P and one healthy D."""
        return any(w.healthy for w in self._workers["prefill"]) and any(
            w.healthy for w in self._workers["decode"]
        )
