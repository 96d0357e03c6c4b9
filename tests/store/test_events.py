"""The store's KV events: a real store publishing through the real publisher into the proxy's
index (stored in L1 and L2, evicted from L1 and from L2, promoted back from L2, re-announced
after a restart)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from lmcache_disagg.proxy.kvevents import EventSource, KVEventSubscriber
from lmcache_disagg.proxy.kvindex import KVIndex
from lmcache_disagg.proxy.kvsync import SyncSettings
from lmcache_disagg.transfer.event_publisher import KVEventPublisher, PublisherSettings
from lmcache_disagg.transfer.events import TierName
from lmcache_disagg.transfer.protocol import LayoutFingerprint
from lmcache_disagg.transfer.store import CacheMiss, ChunkStore, Tier
from lmcache_disagg.transfer.store.format import record_size
from lmcache_disagg.vllm_server import free_port

from .utils import BLOCK, CHUNK, FP, chain, chunk_bytes, drained, root_of, settings, tokens

FP_OTHER = LayoutFingerprint(
    model="other-model", dtype="float32", num_layers=2, num_kv_heads=1, head_dim=8,
    chunk_size=CHUNK, tp_rank=0, tp_size=1,
)  # fmt: skip
RECORD = record_size(CHUNK, FP.page_bytes)
FAST = SyncSettings(min_expiry=0.5, expiry_heartbeats=5, snapshot_timeout=0.5)


def store_one_by_one(
    store: ChunkStore, prompt: list[int], fp: LayoutFingerprint = FP
) -> list[bytes]:
    """Store chunk by chunk, waiting for each write-through (its pin) before the next."""
    keys = chain(root_of(fp), prompt)
    parent = root_of(fp)
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
    """Records the store's listener calls and, with ``forward``, passes them on unchanged."""

    def __init__(self, forward: KVEventPublisher | None = None) -> None:
        self.calls: list[tuple[str, int, str]] = []
        self.evicted_keys: dict[str, list[bytes]] = {}
        self._forward = forward

    def stored(self, keys: Sequence[bytes], tier: TierName) -> None:
        self.calls.append(("stored", len(keys), tier))
        if self._forward is not None:
            self._forward.stored(keys, tier)

    def evicted(self, keys: Sequence[bytes], tier: TierName) -> None:
        self.calls.append(("evicted", len(keys), tier))
        self.evicted_keys.setdefault(tier, []).extend(keys)
        if self._forward is not None:
            self._forward.evicted(keys, tier)

    def promoted(self, keys: Sequence[bytes], tier: TierName, source: TierName) -> None:
        self.calls.append(("promoted", len(keys), f"{tier}<{source}"))
        if self._forward is not None:
            self._forward.promoted(keys, tier, source)


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


# -- L2: what the disk tier's index holds is what the proxy's index lists ----------------------
def _worker_events(
    closers: list[Callable[[], None]], port: int | None = None
) -> tuple[KVEventPublisher, KVIndex, KVEventSubscriber]:
    """A worker's publisher ("w0") and a proxy's index fed by a real subscriber on loopback."""
    endpoint = f"tcp://127.0.0.1:{port or 0}"
    publisher = KVEventPublisher(
        PublisherSettings(endpoint, heartbeat_interval=0.1), FP, "worker-0"
    ).start()
    closers.append(publisher.close)
    index = KVIndex()
    subscriber = KVEventSubscriber(
        [EventSource("w0", publisher.endpoint, publisher.snapshot_endpoint)], index, FAST,
        poll_interval=0.01,
    ).start()  # fmt: skip
    closers.append(subscriber.close)
    return publisher, index, subscriber


def _disk_store(directory: Path, listener: object, **fields: object) -> ChunkStore:
    fields.setdefault("max_local_disk_size", 64 << 20)
    store = ChunkStore(
        settings(local_disk=directory, **fields),
        FP,
        listener=listener,  # type: ignore[arg-type]
    )
    store.start()
    return store


def _on_disk(directory: Path, keys: Sequence[bytes]) -> set[bytes]:
    names = " ".join(p.name for p in directory.iterdir())
    return {key for key in keys if key.hex() in names}


def test_disk_budget_evictions_are_published_for_exactly_the_deleted_keys(
    tmp_path: Path, closers: list[Callable[[], None]]
) -> None:
    # An earlier run of another model left files here: the shared budget deletes them first,
    # and they are no keys of this worker's fingerprint, so they are never announced.
    other = ChunkStore(settings(local_disk=tmp_path, max_local_disk_size=64 << 20), FP_OTHER)
    other.start()
    other_keys = store_one_by_one(other, tokens(4 * CHUNK, start=500_000), fp=FP_OTHER)
    other.close()
    old = time.time() - 3600
    for path in tmp_path.iterdir():
        os.utime(path, (old, old))

    publisher, index, _ = _worker_events(closers)
    recorder = Recorder(forward=publisher)
    store = _disk_store(
        tmp_path, recorder, local_cpu=False, max_local_disk_size=10 * RECORD,
        disk_scan_interval=0.0,
    )  # fmt: skip
    closers.append(store.close)
    written: list[bytes] = []
    for i in range(30):  # three times what fits
        written += store_one_by_one(store, tokens(CHUNK, start=10_000 * (i + 1)))
    present = _on_disk(tmp_path, written)
    assert _on_disk(tmp_path, other_keys) == set()  # the budget deleted the other model's files
    assert 0 < len(present) < len(written)
    assert store.chunks(Tier.L2) == len(present)

    evicted = recorder.evicted_keys.get("l2", [])
    assert len(evicted) == len(set(evicted))  # each deleted chunk announced once
    assert set(evicted) == set(written) - present
    assert set(recorder.evicted_keys) == {"l2"}  # L1 is off: nothing else left any tier

    def index_matches_disk() -> bool:
        return all(
            index.tiers_of("w0", key) == (("l2",) if key in present else ()) for key in written
        )

    assert wait_until(index_matches_disk), [index.tiers_of("w0", k) for k in written]
    assert index.worker_keys("w0") == len(present)


def test_chunks_on_disk_at_start_are_announced_and_served(
    tmp_path: Path, closers: list[Callable[[], None]]
) -> None:
    prompt = tokens(3 * CHUNK)
    first = _disk_store(tmp_path, None)
    keys = store_one_by_one(first, prompt)
    first.close()

    publisher, index, subscriber = _worker_events(closers)
    # The subscriber is in step before the store starts: the start-up announcement arrives as a
    # batch, not only in a snapshot.
    assert wait_until(lambda: subscriber.synced("w0"))
    store = _disk_store(tmp_path, publisher)
    closers.append(store.close)
    assert store.chunks(Tier.L2) == 3
    assert wait_until(lambda: index.prefix_chunks("w0", keys) == 3)
    assert all(index.tiers_of("w0", key) == ("l2",) for key in keys)
    # ... and what is announced is what a lookup finds.
    hit = store.lookup(root_of(), keys, prompt, len(prompt), BLOCK, "warm")
    assert hit.num_tokens == len(prompt) and {c.tier for c in hit.chunks} == {Tier.L2}
    store.release("warm")


def test_a_restarted_worker_re_announces_its_disk(
    tmp_path: Path, closers: list[Callable[[], None]]
) -> None:
    port = free_port()
    publisher, index, subscriber = _worker_events(closers, port)
    prompt = tokens(3 * CHUNK)
    store = _disk_store(tmp_path, publisher, max_local_cpu_size=2 * FP.page_bytes)
    keys = store_one_by_one(store, prompt)
    assert wait_until(lambda: index.prefix_chunks("w0", keys) == 3)
    store.close()
    publisher.close()

    # The same worker again: same endpoints, a new epoch, an empty RAM tier, the same disk.
    restarted = KVEventPublisher(
        PublisherSettings(f"tcp://127.0.0.1:{port}", heartbeat_interval=0.1), FP, "worker-0"
    ).start()
    closers.append(restarted.close)
    again = _disk_store(tmp_path, restarted, max_local_cpu_size=2 * FP.page_bytes)
    closers.append(again.close)
    assert wait_until(lambda: subscriber.stats().totals.restarts == 1 and subscriber.synced("w0"))
    assert wait_until(lambda: all(index.tiers_of("w0", key) == ("l2",) for key in keys)), [
        index.tiers_of("w0", key) for key in keys
    ]
    assert index.worker_keys("w0") == 3  # nothing left of the first run's L1 entries


def test_a_corrupt_file_deleted_on_read_is_published_as_evicted(
    tmp_path: Path, closers: list[Callable[[], None]]
) -> None:
    prompt = tokens(2 * CHUNK)
    first = _disk_store(tmp_path, None)
    keys = store_one_by_one(first, prompt)
    first.close()
    (victim,) = (p for p in tmp_path.iterdir() if keys[1].hex() in p.name)
    data = bytearray(victim.read_bytes())
    data[-100] ^= 0x01  # the header is intact: indexed at start, caught by the read's checksum
    victim.write_bytes(bytes(data))

    publisher, index, _ = _worker_events(closers)
    recorder = Recorder(forward=publisher)
    store = _disk_store(tmp_path, recorder)
    closers.append(store.close)
    assert wait_until(lambda: index.prefix_chunks("w0", keys) == 2)
    hit = store.lookup(root_of(), keys, prompt, len(prompt), BLOCK, "bad")
    assert hit.num_tokens == len(prompt)
    with pytest.raises(CacheMiss) as info:
        store.fetch("bad", 5.0)
    store.release("bad")
    assert info.value.index == 1 and info.value.reason == "checksum"
    assert not victim.exists()
    assert recorder.evicted_keys == {"l2": [keys[1]]}
    # The good chunk was promoted into RAM; the bad one is gone from every tier of the index.
    assert wait_until(lambda: index.tiers_of("w0", keys[1]) == ())
    assert wait_until(lambda: index.tiers_of("w0", keys[0]) == ("l1", "l2"))
    assert index.prefix_chunks("w0", keys) == 1


def test_files_another_rank_evicts_are_published_by_their_owner_only(
    tmp_path: Path, closers: list[Callable[[], None]]
) -> None:
    rank0 = LayoutFingerprint(**{**{f: getattr(FP, f) for f in FP.__struct_fields__}, "tp_size": 2})
    rank1 = LayoutFingerprint(**{**{f: getattr(FP, f) for f in FP.__struct_fields__},
                                 "tp_rank": 1, "tp_size": 2})  # fmt: skip
    limit = 8 * RECORD
    recorders = [Recorder(), Recorder()]
    stores = []
    for fp, recorder in zip((rank0, rank1), recorders, strict=True):
        store = ChunkStore(
            settings(local_disk=tmp_path, local_cpu=False, max_local_disk_size=limit,
                     disk_scan_interval=0.0),
            fp, listener=recorder,
        )  # fmt: skip
        store.start()
        closers.append(store.close)
        stores.append(store)
    mine = store_one_by_one(stores[0], tokens(4 * CHUNK), fp=rank0)
    theirs: list[bytes] = []
    for i in range(12):  # rank 1 fills the shared budget: rank 0's older files go first
        theirs += store_one_by_one(stores[1], tokens(CHUNK, start=10_000 * (i + 1)), fp=rank1)
    gone = set(mine) - _on_disk(tmp_path, mine)
    assert gone  # rank 1 deleted some of rank 0's files ...
    assert set(recorders[1].evicted_keys.get("l2", [])) <= set(theirs)  # ... and said nothing
    # Rank 0 notices on its next write (a rescan) and announces exactly its own lost chunks.
    mine += store_one_by_one(stores[0], tokens(CHUNK, start=900_000), fp=rank0)
    lost = set(mine) - _on_disk(tmp_path, mine)
    assert set(recorders[0].evicted_keys["l2"]) == lost and lost >= gone
    assert stores[0].chunks(Tier.L2) == len(mine) - len(lost)
