"""Bounds with every tier on: an overfill of 10x L1 keeps L1 within its capacity, the disk under
its limit (stale files present) and this process's RSS within a stated margin; afterwards every
pin and reservation is back to 0."""

from __future__ import annotations

import os
import time
from pathlib import Path

from lmcache_disagg.transfer.protocol import LayoutFingerprint
from lmcache_disagg.transfer.store import ChunkStore, MemoryStoreMetrics, StoreSettings, Tier

from .redis_servers import RedisServer
from .utils import drained

# 2 layers x 2 x 256 tokens x 2 heads x 128 dims x 4 bytes = 1 MiB per chunk page
FP_BIG = LayoutFingerprint(
    model="bounds", dtype="float32", num_layers=2, num_kv_heads=2, head_dim=128,
    chunk_size=256, tp_rank=0, tp_size=1,
)  # fmt: skip
L1_PAGES = 16
# Stated margin over the preallocated L1: L3 writes in flight (bounded in bytes), the record
# being copied, allocator slack.
RSS_MARGIN = 96 << 20


def _rss_bytes() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_overfill_with_every_tier_on(tmp_path: Path, redis_server: RedisServer) -> None:
    page_bytes = FP_BIG.page_bytes
    disk_limit = 12 * page_bytes
    disk = tmp_path / "l2"
    disk.mkdir()
    old = time.time() - 7200
    for i in range(8):  # an earlier run's files
        stale = disk / f"earlier-{i}.kv"
        stale.write_bytes(b"\1" * page_bytes)
        os.utime(stale, (old, old))
    metrics = MemoryStoreMetrics()
    store = ChunkStore(
        StoreSettings(
            max_local_cpu_size=L1_PAGES * page_bytes,
            local_disk=disk,
            max_local_disk_size=disk_limit,
            disk_scan_interval=0.0,
            remote_url=redis_server.url,
            remote_timeout=2.0,
            remote_ttl=60.0,
        ),
        FP_BIG,
        metrics,
    )
    store.start()
    capacity = store.usage()[Tier.L1][1]
    assert capacity == L1_PAGES * page_bytes
    rss_before = _rss_bytes()
    peak = rss_before
    root = b"\0" * 16
    for i in range(10 * L1_PAGES):
        ids = [i + 1] * 256
        key = i.to_bytes(16, "little")
        page = store.reserve_page()
        assert page is not None
        page.fill_(i % 251)
        store.commit(page, key, root, ids, page_bytes)
        assert store.usage()[Tier.L1][0] <= capacity
        peak = max(peak, _rss_bytes())
        if i % L1_PAGES == 0:
            store.flush(30.0)
            used = sum(p.stat().st_size for p in disk.iterdir() if p.is_file())
            assert used <= disk_limit, f"disk holds {used} > {disk_limit}"
    assert store.flush(30.0)
    used = sum(p.stat().st_size for p in disk.iterdir() if p.is_file())
    assert used <= disk_limit
    assert not any(p.name.startswith("earlier-") for p in disk.iterdir())
    assert peak - rss_before <= RSS_MARGIN, f"RSS grew by {(peak - rss_before) >> 20} MiB"
    assert metrics.total("evictions", Tier.L1) == 9 * L1_PAGES
    assert metrics.total("evictions", Tier.L2) >= 8
    assert drained(store) and store.leases() == 0
    store.close()
