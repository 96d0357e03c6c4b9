"""Every metric the store reports uses a documented name; write-through backpressure is counted
and releases its pins."""

from __future__ import annotations

from pathlib import Path

from lmcache_disagg.transfer.store import ChunkStore, MemoryStoreMetrics, Tier
from lmcache_disagg.transfer.store.metrics import COUNTERS, GAUGES, HISTOGRAMS

from .redis_servers import RedisServer
from .utils import BLOCK, CHUNK, FP, chain, drained, root_of, settings, store_prompt, tokens


def test_names_are_the_documented_ones(tmp_path: Path, redis_server: RedisServer) -> None:
    metrics = MemoryStoreMetrics()
    store = ChunkStore(
        settings(local_disk=tmp_path, max_local_disk_size=1 << 26, remote_url=redis_server.url),
        FP,
        metrics,
    )
    store.start()
    prompt = tokens(2 * CHUNK + 3)
    store_prompt(store, prompt)
    assert store.flush(10.0)
    fresh = ChunkStore(settings(remote_url=redis_server.url), FP, metrics)
    fresh.start()
    keys = chain(root_of(), prompt)
    hit = fresh.lookup(root_of(), keys, prompt, len(prompt) - 1, BLOCK, "m")
    assert hit.num_tokens > 0
    fresh.fetch("m", 5.0)
    fresh.release("m")
    for name, _, _ in metrics.counts:
        assert name in COUNTERS, name
    for name, _ in metrics.samples:
        assert name in HISTOGRAMS, name
    for name, _ in metrics.gauges:
        assert name in GAUGES, name
    for tier in (Tier.L1, Tier.L2, Tier.L3):
        assert metrics.total("written_bytes", tier) > 0
    assert metrics.total("hits", Tier.L3) > 0 and metrics.total("promotions", Tier.L3) > 0
    assert (
        metrics.samples[("store_seconds", Tier.L2)] and metrics.samples[("load_seconds", Tier.L3)]
    )
    assert metrics.gauges[("capacity_bytes", Tier.L1)] == store.usage()[Tier.L1][1]
    fresh.close()
    store.close()


def test_a_full_write_queue_drops_writes_counts_them_and_releases_their_pins(
    redis_server: RedisServer,
) -> None:
    metrics = MemoryStoreMetrics()
    store = ChunkStore(
        settings(
            remote_url=redis_server.url,
            remote_timeout=1.0,
            remote_max_connections=1,
            write_queue=1,
        ),
        FP,
        metrics,
    )
    store.start()
    redis_server.pause()  # writes hang until their deadline: the writer falls behind
    try:
        for i in range(30):
            store_prompt(store, tokens(CHUNK, start=1000 * i))
        assert metrics.total("faults", Tier.L3, reason="queue_full") >= 1
    finally:
        redis_server.resume()
    assert drained(store)
    assert store.chunks(Tier.L1) == 30  # every chunk still served from RAM
    store.close()
