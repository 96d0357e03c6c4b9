"""What the store tells a listener about its key set (KV events for cache-aware routing).

:class:`~lmcache_disagg.transfer.event_publisher.KVEventPublisher` implements
:class:`StoreListener`. The store calls it under its own locks (the store's for L1, the disk
tier's for L2), so the calls come in the order the key set changed. An implementation must only
record and return: never block on I/O and never call back into the store (that would take the
store's locks in the opposite order and can deadlock).

Calls, each with the chunk keys of the store's own layout fingerprint:

* ``stored``: after an L1 commit, after a finished L2 write, for the chunks the L2 index found on
  disk at start, and after a submitted L3 write;
* ``evicted``: when L1 drops a chunk for room, and when a chunk leaves the L2 index (deleted by the
  directory's shared size budget, deleted as corrupt or truncated on a read, or found deleted by
  another process). Files the L2 index never held (another rank's or model's, ones that were bad
  at start) were never announced and are not announced when deleted;
* ``promoted``: when a lower-tier chunk is copied into L1.

L3 entries that Redis expires or evicts are not reported (the index then lists a chunk the worker
no longer has: slower, never wrong).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, Protocol

from lmcache_disagg.transfer.events import TierName
from lmcache_disagg.transfer.store.tier import Tier

__all__ = ["TIER_NAMES", "NullStoreListener", "StoreListener"]

TIER_NAMES: Final[dict[Tier, TierName]] = {Tier.L1: "l1", Tier.L2: "l2", Tier.L3: "l3"}


class StoreListener(Protocol):
    def stored(self, keys: Sequence[bytes], tier: TierName) -> None: ...

    def evicted(self, keys: Sequence[bytes], tier: TierName) -> None: ...

    def promoted(self, keys: Sequence[bytes], tier: TierName, source: TierName) -> None: ...


class NullStoreListener:
    def stored(self, keys: Sequence[bytes], tier: TierName) -> None:
        pass

    def evicted(self, keys: Sequence[bytes], tier: TierName) -> None:
        pass

    def promoted(self, keys: Sequence[bytes], tier: TierName, source: TierName) -> None:
        pass
