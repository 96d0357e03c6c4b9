"""The proxy's index of which worker holds which KV chunk: chunk key -> {worker: tiers}.

Fed by the KV events subscriber (:mod:`lmcache_disagg.proxy.kvevents`), read by the cache-aware
policy. It is a hint, never the truth: a worker may have evicted a chunk the index still lists
(the request is then only slower, never wrong, because the worker's own store decides what it
loads).

* **Bounded.** At most ``max_keys`` distinct keys, in LRU order (a key is refreshed when stored
  or matched); the least recently used key is dropped with all its workers when full.
* **Fingerprint separation.** Each worker has one :class:`LayoutFingerprint` (from its events).
  A lookup hashes the prompt with that worker's fingerprint (see :meth:`KVIndex.fingerprints`), so
  the keys of another model or layout never match; a worker whose fingerprint changes starts
  empty.
* **Thread-safe.** One lock; the subscriber thread writes, the event loop reads. Every call is
  O(keys it touches).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from lmcache_disagg.transfer.events import (
    TIERS,
    ChunkEvent,
    ChunkEvicted,
    ChunkPromoted,
    ChunkStored,
    TierName,
)
from lmcache_disagg.transfer.protocol import LayoutFingerprint

__all__ = ["IndexStats", "KVIndex"]

_TIER_BIT: dict[TierName, int] = {tier: 1 << i for i, tier in enumerate(TIERS)}


@dataclass(frozen=True)
class IndexStats:
    keys: int
    workers: int
    evicted_keys: int
    """Keys dropped because the index was full (LRU)."""


class KVIndex:
    def __init__(self, max_keys: int = 1 << 18) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be >= 1")
        self._max_keys = max_keys
        self._lock = threading.Lock()
        self._entries: OrderedDict[bytes, dict[str, int]] = OrderedDict()
        self._by_worker: dict[str, set[bytes]] = {}
        self._fingerprints: dict[str, LayoutFingerprint] = {}
        self._fp_view: Mapping[str, LayoutFingerprint] = MappingProxyType(self._fingerprints)
        self._evicted = 0

    # -- writes (the subscriber) ---------------------------------------------------------------
    def apply(
        self, worker: str, fingerprint: LayoutFingerprint, events: Iterable[ChunkEvent]
    ) -> None:
        """Apply one batch of ``worker``'s events, in order."""
        with self._lock:
            self._set_fingerprint_locked(worker, fingerprint)
            for event in events:
                if isinstance(event, ChunkEvicted):
                    self._remove_locked(worker, event.keys, _TIER_BIT[event.tier])
                elif isinstance(event, ChunkStored | ChunkPromoted):
                    self._add_locked(worker, event.keys, _TIER_BIT[event.tier])

    def replace(
        self,
        worker: str,
        fingerprint: LayoutFingerprint,
        tiers: Mapping[TierName, Sequence[bytes]],
    ) -> None:
        """Replace everything known about ``worker`` with a snapshot."""
        with self._lock:
            self._drop_locked(worker)
            self._set_fingerprints_locked({**self._fingerprints, worker: fingerprint})
            for tier, keys in tiers.items():
                self._add_locked(worker, keys, _TIER_BIT[tier])

    def drop_worker(self, worker: str) -> None:
        """Forget ``worker`` (it stopped heartbeating, restarted, or left the pool)."""
        with self._lock:
            self._drop_locked(worker)
            if worker in self._fingerprints:
                rest = {w: fp for w, fp in self._fingerprints.items() if w != worker}
                self._set_fingerprints_locked(rest)

    # -- reads (the policy) --------------------------------------------------------------------
    def fingerprints(self) -> Mapping[str, LayoutFingerprint]:
        """Each known worker's fingerprint (hash a prompt once per distinct value).

        A read-only snapshot: changes replace it, so readers never copy it."""
        return self._fp_view

    def prefix_chunks(self, worker: str, keys: Sequence[bytes]) -> int:
        """How many leading ``keys`` (a prompt's chain, in order) ``worker`` holds in any tier.

        The chain makes a key imply its whole prefix, so this is the longest cached prefix in
        chunks. Matched keys are refreshed in the LRU order.
        """
        count = 0
        with self._lock:
            for key in keys:
                holders = self._entries.get(key)
                if holders is None or worker not in holders:
                    break
                self._entries.move_to_end(key)
                count += 1
        return count

    def tiers_of(self, worker: str, key: bytes) -> tuple[TierName, ...]:
        with self._lock:
            mask = self._entries.get(key, {}).get(worker, 0)
        return tuple(tier for tier, bit in _TIER_BIT.items() if mask & bit)

    def worker_keys(self, worker: str) -> int:
        with self._lock:
            return len(self._by_worker.get(worker, ()))

    def stats(self) -> IndexStats:
        with self._lock:
            return IndexStats(len(self._entries), len(self._fingerprints), self._evicted)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    # -- internals (lock held) -----------------------------------------------------------------
    def _set_fingerprint_locked(self, worker: str, fingerprint: LayoutFingerprint) -> None:
        if self._fingerprints.get(worker) != fingerprint:
            self._drop_locked(worker)
            self._set_fingerprints_locked({**self._fingerprints, worker: fingerprint})

    def _set_fingerprints_locked(self, fingerprints: dict[str, LayoutFingerprint]) -> None:
        self._fingerprints = fingerprints
        self._fp_view = MappingProxyType(fingerprints)

    def _add_locked(self, worker: str, keys: Iterable[bytes], bit: int) -> None:
        mine = self._by_worker.setdefault(worker, set())
        entries = self._entries
        for key in keys:
            holders = entries.get(key)
            if holders is None:
                holders = entries[key] = {}
            else:
                entries.move_to_end(key)
            holders[worker] = holders.get(worker, 0) | bit
            mine.add(key)
        while len(entries) > self._max_keys:
            old, holders = entries.popitem(last=False)
            self._evicted += 1
            for name in holders:
                self._by_worker[name].discard(old)

    def _remove_locked(self, worker: str, keys: Iterable[bytes], bit: int) -> None:
        mine = self._by_worker.get(worker)
        if not mine:
            return
        for key in keys:
            holders = self._entries.get(key)
            if holders is None or worker not in holders:
                continue
            mask = holders[worker] & ~bit
            if mask:
                holders[worker] = mask
                continue
            del holders[worker]
            mine.discard(key)
            if not holders:
                del self._entries[key]

    def _drop_locked(self, worker: str) -> None:
        for key in self._by_worker.pop(worker, set()):
            holders = self._entries.get(key)
            if holders is None:
                continue
            holders.pop(worker, None)
            if not holders:
                del self._entries[key]
