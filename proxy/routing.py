"""Routing policies: pick a worker of a role for one request.

* ``round_robin``  - rotate over usable workers.
* ``least_loaded`` - fewest outstanding (estimated) tokens, ties broken by rotation.
* ``prefix_aware`` - rendezvous hashing of the prompt prefix, so the same prefix lands on the same
  worker while the set of usable workers is unchanged (and moves minimally when it changes).
"""

from __future__ import annotations

from collections.abc import Collection

import xxhash

from lmcache_disagg.proxy.settings import Policy
from lmcache_disagg.proxy.workers import Role, Worker, WorkerPool

__all__ = ["Router"]


class Router:
    """Picks workers. Called once per attempt from the event loop thread."""

    def __init__(self, pool: WorkerPool, policy: Policy) -> None:
        self._pool = pool
        self._policy = policy
        self._counters: dict[Role, int] = {"prefill": 0, "decode": 0}

    def pick(self, role: Role, prefix: bytes, exclude: Collection[Worker] = ()) -> Worker | None:
        """A usable worker of ``role`` not in ``exclude``, or None if there is none."""
        candidates = [w for w in self._pool.role(role) if w.usable() and w not in exclude]
        if not candidates:
            return None
        if len(candidates) == 1:
            chosen = candidates[0]
        elif self._policy == "prefix_aware" and prefix:
            chosen = max(candidates, key=lambda w: xxhash.xxh64_intdigest(prefix, seed=_seed(w)))
        else:
            count = self._counters[role]
            self._counters[role] = count + 1
            start = count % len(candidates)
            if self._policy == "least_loaded":
                rotated = candidates[start:] + candidates[:start]
                chosen = min(rotated, key=lambda w: w.outstanding_tokens)
            else:
                chosen = candidates[start]
        chosen.breaker.acquire()
        return chosen


def _seed(worker: Worker) -> int:
    return xxhash.xxh64_intdigest(worker.http.encode())
