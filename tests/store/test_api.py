"""The public surface of lmcache_disagg.transfer.store (STORE_API.md): names and signatures."""

from __future__ import annotations

import inspect

import lmcache_disagg.transfer.store as store_pkg
from lmcache_disagg.transfer.store import (
    CacheMiss,
    ChunkStore,
    Hit,
    HitChunk,
    NullStoreMetrics,
    StoreMetrics,
    StoreSettings,
    Tier,
)


def test_exported_members() -> None:
    assert sorted(store_pkg.__all__) == [
        "CacheMiss", "ChunkStore", "Hit", "HitChunk", "MemoryStoreMetrics", "NullStoreMetrics",
        "RecordError", "StoreError", "StoreMetrics", "StoreSettings", "Tier",
    ]  # fmt: skip
    for name in store_pkg.__all__:
        assert getattr(store_pkg, name) is not None


def test_contract_names_and_parameters() -> None:
    assert [t.value for t in Tier] == ["l1", "l2", "l3"]
    params = {
        "lookup": ["root", "keys", "token_ids", "max_tokens", "block_size", "lease_id", "ttl"],
        "commit": ["page", "key", "parent", "token_ids", "nbytes"],
        "fetch": ["lease_id", "timeout"],
        "release": ["lease_id"],
        "abandon": ["page"],
        "contains": ["key", "remote"],
        "flush": ["timeout"],
        "close": ["timeout"],
    }
    for method, names in params.items():
        signature = inspect.signature(getattr(ChunkStore, method))
        assert list(signature.parameters)[1:] == names, method
    for method in ("start", "reserve_page", "pinned_chunks", "leases", "usage", "reserved_pages"):
        assert callable(getattr(ChunkStore, method))
    assert isinstance(ChunkStore.enabled, property)
    assert callable(StoreSettings.from_config)
    assert [f for f in HitChunk.__dataclass_fields__] == [
        "key",
        "tier",
        "num_tokens",
        "stored_tokens",
    ]
    assert Hit().num_tokens == 0 and Hit().chunks == []
    miss = CacheMiss(2, "checksum")
    assert miss.index == 2 and miss.reason == "checksum"
    metrics: StoreMetrics = NullStoreMetrics()
    metrics.count("hits", Tier.L1)
    metrics.observe("load_seconds", Tier.L2, 0.1)
    metrics.gauge("used_bytes", Tier.L3, 0)
