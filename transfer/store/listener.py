"""What the store tells a listener about its key set (KV events for cache-aware routing).

:class:`~lmcache_disagg.transfer.event_publisher.KVEventPublisher` implements
:class:`StoreListener`. The store calls it under its own lock, so an implementation must only
record and return (never block on I/O). Calls: ``stored`` after an L1 commit and after a finished
L2 write or a submitted L3 write; ``evicted`` when L1 drops a chunk for room; ``promoted`` when
a lower-tier chunk is copied into L1. Disk evictions by the shared size budget are not reported
(the index then lists a chunk the worker no longer has: slower, never wrong).
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
