"""The tiered chunk store: L1 CPU RAM, L2 local disk, L3 Redis/Valkey (issue 13).

One content-addressed store per worker (TP rank) and layout fingerprint. Keys are computed by the
caller (the connector's hash chain); the store verifies what it reads from the lower tiers. See
:class:`ChunkStore` and STORE_API.md for the contract.
"""

from lmcache_disagg.transfer.store.errors import CacheMiss, RecordError, StoreError
from lmcache_disagg.transfer.store.metrics import MemoryStoreMetrics, NullStoreMetrics, StoreMetrics
from lmcache_disagg.transfer.store.settings import StoreSettings
from lmcache_disagg.transfer.store.store import ChunkStore
from lmcache_disagg.transfer.store.tier import Hit, HitChunk, Tier

__all__ = [
    "CacheMiss",
    "ChunkStore",
    "Hit",
    "HitChunk",
    "MemoryStoreMetrics",
    "NullStoreMetrics",
    "RecordError",
    "StoreError",
    "StoreMetrics",
    "StoreSettings",
    "Tier",
]
