"""The store's KV events: a real store publishing through the real publisher into the proxy's
index (stored in L1 and L2, evicted from L1, promoted back from L2)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from lmcache_disagg.proxy.kvevents import EventSource, KVEventSubscriber
from lmcache_disagg.proxy.kvindex import KVIndex
from lmcache_disagg.transfer.event_publisher import KVEventPublisher, PublisherSettings
from lmcache_disagg.transfer.events import TierName
from lmcache_disagg.transfer.store import ChunkStore

from .utils import BLOCK, CHUNK, FP, chain, chunk_bytes, drained, root_of, settings, tokens


def store_one_by_one(store: ChunkStore, prompt: list[int]) -> list[bytes]:
    """Store chunk by chunk, waiting for each write-through (its pin) before the next."""
    keys = chain(root_of(), prompt)
    parent = root_of()
    for i, key in enumerate(keys):
        ids = prompt[i * CHUNK : (i + 1) * CHUNK]
        page = store.reserve_page()
        assert page is not None
        data = chunk_bytes(ids)
        page[: data.numel()].copy_(data)
        store.commit(page, key, parent, ids, data.numel())
        parent = key
        assert store.flush(10.0)
    return keys


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int, str]] = []

    def stored(self, keys: Sequence[bytes], tier: TierName) -> None:
        self.calls.append(("stored", len(keys), tier))

    def evicted(self, keys: Sequence[bytes], tier: TierName) -> None:
        self.calls.append(("evicted", len(keys), tier))

    def promoted(self, keys: Sequence[bytes], tier: TierName, source: TierName) -> None:
        self.calls.append(("promoted", len(keys), f"{tier}<{source}"))


def wait_until(predicate, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_listener_calls(tmp_path: Path) -> None:
    recorder = Recorder()
    store = ChunkStore(
        settings(max_local_cpu_size=2 * FP.page_bytes, local_disk=tmp_path,
                 max_local_disk_size=64 << 20),
        FP, listener=recorder,
    )  # fmt: skip
    store.start()
    try:
        prompt = tokens(3 * CHUNK)
        store_one_by_one(store, prompt)
        calls = recorder.calls
        assert calls.count(("stored", 1, "l1")) == 3 and calls.count(("stored", 1, "l2")) == 3
        assert ("evicted", 1, "l1") in calls  # 3 chunks through 2 pages
        # One of the first two chunks left RAM (it is on disk): fetching both promotes it.
        head = prompt[: 2 * CHUNK]
        hit = store.lookup(root_of(), chain(root_of(), head), head, len(head), BLOCK, "a")
        store.fetch("a", 5.0)
        store.release("a")
        assert hit.num_tokens == len(head)
        assert any(c[0] == "promoted" and c[2] == "l1<l2" for c in calls)
        assert drained(store)
    finally:
        store.close()


def test_store_events_reach_the_proxy_index(tmp_path: Path) -> None:
    publisher = KVEventPublisher(
        PublisherSettings("tcp://127.0.0.1:0", heartbeat_interval=0.1), FP, "worker-0"
    ).start()
    index = KVIndex()
    subscriber = KVEventSubscriber(
        [EventSource("w0", publisher.endpoint, publisher.snapshot_endpoint)], index,
        poll_interval=0.01,
    ).start()  # fmt: skip
    store = ChunkStore(
        settings(max_local_cpu_size=2 * FP.page_bytes, local_disk=tmp_path,
                 max_local_disk_size=64 << 20),
        FP, listener=publisher,
    )  # fmt: skip
    store.start()
    try:
        prompt = tokens(3 * CHUNK)
        keys = store_one_by_one(store, prompt)

        # Every chunk is on disk; one of the first two left RAM to make room for the third.
        def settled() -> bool:
            tiers = [index.tiers_of("w0", key) for key in keys]
            return tiers.count(("l2",)) == 1 and tiers.count(("l1", "l2")) == 2

        assert wait_until(settled), [index.tiers_of("w0", key) for key in keys]
        assert index.tiers_of("w0", keys[2]) == ("l1", "l2")
        assert index.prefix_chunks("w0", keys) == 3
    finally:
        store.close()
        subscriber.close()
        publisher.close()
