"""Routing policies: pick a worker of a role for one request.

* ``round_robin``  - rotate over usable workers.
* ``least_loaded`` - fewest outstanding (estimated) tokens, ties broken by rotation.
* ``prefix_aware`` - rendezvous hashing of the prompt prefix, so the same prefix lands on the same
  worker while the set of usable workers is unchanged (and moves minimally when it changes).
* ``cache_aware``  - the longest prefix the worker holds (from its KV events) against its load
  (:mod:`lmcache_disagg.proxy.cache_aware`); a request the proxy cannot tokenize goes by
  ``least_loaded``.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING

import xxhash

from lmcache_disagg.proxy.settings import Policy
from lmcache_disagg.proxy.workers import Role, Worker, WorkerPool

if TYPE_CHECKING:
    from lmcache_disagg.proxy.cache_aware import Choice
    from lmcache_disagg.proxy.kvrouting import KVRouting

__all__ = ["Router"]


class Router:
    """Picks workers. Called once per attempt from the event loop thread."""

    def __init__(self, pool: WorkerPool, policy: Policy, kv: KVRouting | None = None) -> None:
        self._pool = pool
        self._policy = policy
        self._kv = kv if policy == "cache_aware" else None
        self._counters: dict[Role, int] = {"prefill": 0, "decode": 0}

    def pick(
        self,
        role: Role,
        prefix: bytes,
        exclude: Collection[Worker] = (),
        tokens: Sequence[int] | None = None,
    ) -> Worker | None:
        """A usable worker of ``role`` not in ``exclude``, or None if there is none."""
        return self.pick_cached(role, prefix, exclude, tokens)[0]

    def pick_cached(
        self,
        role: Role,
        prefix: bytes,
        exclude: Collection[Worker] = (),
        tokens: Sequence[int] | None = None,
    ) -> tuple[Worker | None, Choice | None]:
        """Like :meth:`pick`, plus cache_aware's choice (its predicted cached tokens) if any."""
        candidates = [w for w in self._pool.role(role) if w.usable() and w not in exclude]
        if not candidates:
            return None, None
        choice: Choice | None = None
        if self._kv is not None and tokens:
            choice = self._kv.choose(tokens, [(w.http, w.outstanding_tokens) for w in candidates])
        if choice is not None:
            chosen = next(w for w in candidates if w.http == choice.name)
        elif len(candidates) == 1:
            chosen = candidates[0]
        elif self._policy == "prefix_aware" and prefix:
            chosen = max(candidates, key=lambda w: xxhash.xxh64_intdigest(prefix, seed=_seed(w)))
        else:
            count = self._counters[role]
            self._counters[role] = count + 1
            start = count % len(candidates)
            if self._policy in ("least_loaded", "cache_aware"):
                rotated = candidates[start:] + candidates[:start]
                chosen = min(rotated, key=lambda w: w.outstanding_tokens)
            else:
                chosen = candidates[start]
        chosen.breaker.acquire()
        return chosen, choice


def _seed(worker: Worker) -> int:
    return xxhash.xxh64_intdigest(worker.http.encode())
