"""The proxy's KV index fed by real publishers over ZMQ: ordering, gaps, restarts, expiry, bounds."""

from __future__ import annotations

import time
from collections.abc import Callable

import msgspec
import pytest
import zmq

from lmcache_disagg.keys import chain_root, chunk_keys
from lmcache_disagg.proxy.kvevents import EventSource, KVEventSubscriber
from lmcache_disagg.proxy.kvindex import KVIndex
from lmcache_disagg.proxy.kvsync import SourceTracker, SyncSettings, SyncState
from lmcache_disagg.transfer.event_publisher import KVEventPublisher, PublisherSettings
from lmcache_disagg.transfer.events import (
    TOPIC,
    ChunkEvicted,
    ChunkStored,
    EventBatch,
    Heartbeat,
    SnapshotReply,
    TierKeys,
    encode,
)
from lmcache_disagg.transfer.protocol import LayoutFingerprint
from lmcache_disagg.vllm_server import free_port

FP = LayoutFingerprint(
    model="m", dtype="float32", num_layers=2, num_kv_heads=2, head_dim=8, chunk_size=4,
    tp_rank=0, tp_size=1,
)  # fmt: skip
TOKENS = list(range(400))
KEYS = chunk_keys(chain_root(FP), TOKENS, FP.chunk_size)
FAST = SyncSettings(min_expiry=0.3, expiry_heartbeats=3, snapshot_timeout=0.5)


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def _publisher(
    port: int | None = None, fp: LayoutFingerprint = FP, **kw: float
) -> KVEventPublisher:
    endpoint = f"tcp://127.0.0.1:{port or 0}"
    settings = PublisherSettings(endpoint, heartbeat_interval=0.1, **kw)  # type: ignore[arg-type]
    return KVEventPublisher(settings, fp).start()


def _subscribe(
    index: KVIndex, closers: list[Callable[[], None]], *pubs: tuple[str, KVEventPublisher]
) -> KVEventSubscriber:
    sources = [EventSource(name, p.endpoint, p.snapshot_endpoint) for name, p in pubs]
    sub = KVEventSubscriber(sources, index, FAST, poll_interval=0.01).start()
    closers.append(sub.close)
    return sub


# -- the index on its own ------------------------------------------------------------------------
def test_index_prefix_tiers_and_ordering_within_a_batch() -> None:
    index = KVIndex()
    index.apply(
        "d0", FP,
        [ChunkStored(KEYS[:4], "l1"), ChunkEvicted(KEYS[2:3], "l1"), ChunkStored(KEYS[2:3], "l2")],
    )  # fmt: skip
    assert index.prefix_chunks("d0", KEYS) == 4
    assert index.tiers_of("d0", KEYS[2]) == ("l2",) and index.tiers_of("d0", KEYS[0]) == ("l1",)
    index.apply("d0", FP, [ChunkEvicted(KEYS[1:2], "l1")])
    assert index.prefix_chunks("d0", KEYS) == 1, "a hole ends the cached prefix"
    assert index.prefix_chunks("d1", KEYS) == 0
    index.drop_worker("d0")
    assert len(index) == 0 and index.stats().workers == 0


def test_index_is_bounded_lru_on_keys() -> None:
    index = KVIndex(max_keys=10)
    index.apply("d0", FP, [ChunkStored(KEYS[:10], "l1")])
    assert index.prefix_chunks("d0", KEYS[:2]) == 2  # refreshes keys 0 and 1
    index.apply("d1", FP, [ChunkStored(KEYS[10:15], "l1")])
    assert len(index) == 10 and index.stats().evicted_keys == 5
    assert index.prefix_chunks("d0", KEYS) == 2, "the refreshed prefix survived, 2..6 did not"
    assert index.worker_keys("d0") == 5


def test_fingerprint_separation() -> None:
    other = msgspec.structs.replace(FP, model="other-model")
    other_keys = chunk_keys(chain_root(other), TOKENS, other.chunk_size)
    index = KVIndex()
    index.apply("a", FP, [ChunkStored(KEYS[:8], "l1")])
    index.apply("b", other, [ChunkStored(other_keys[:8], "l1")])
    assert index.fingerprints() == {"a": FP, "b": other}
    # The same tokens hashed for each worker's own fingerprint only match that worker.
    assert index.prefix_chunks("a", KEYS) == 8 and index.prefix_chunks("b", KEYS) == 0
    assert index.prefix_chunks("b", other_keys) == 8 and index.prefix_chunks("a", other_keys) == 0
    # A worker that comes back with another fingerprint starts empty.
    index.apply("a", other, [])
    assert index.prefix_chunks("a", KEYS) == 0 and index.worker_keys("a") == 0


# -- the sync state machine ----------------------------------------------------------------------
def _batch(seq: int, *events: ChunkStored | ChunkEvicted, epoch: int = 1) -> EventBatch:
    return EventBatch("p", epoch, seq, FP, list(events))


def test_tracker_detects_gaps_buffers_and_resyncs() -> None:
    index = KVIndex()
    tracker = SourceTracker("d0", index, FAST)
    assert tracker.wants_snapshot(0.0)
    tracker.snapshot_requested(0.0)
    assert not tracker.wants_snapshot(0.1)
    tracker.on_snapshot(SnapshotReply("p", 1, 2, FP, [TierKeys("l1", KEYS[:2])]), 0.1)
    assert tracker.state is SyncState.SYNCED and index.prefix_chunks("d0", KEYS) == 2
    tracker.on_message(_batch(2, ChunkStored(KEYS[9:10], "l1")), 0.2)  # already in the snapshot
    assert tracker.counters.stale == 1 and index.worker_keys("d0") == 2
    tracker.on_message(_batch(3, ChunkStored(KEYS[2:3], "l1")), 0.2)
    tracker.on_message(_batch(5, ChunkStored(KEYS[4:5], "l1")), 0.3)  # 4 is lost
    assert tracker.state is SyncState.RESYNCING and tracker.counters.lost_batches == 1
    assert tracker.wants_snapshot(0.3)
    tracker.snapshot_requested(0.3)
    assert tracker.wants_snapshot(0.3 + FAST.snapshot_timeout), "an unanswered request is retried"
    tracker.on_message(_batch(6, ChunkEvicted(KEYS[0:1], "l1")), 0.4)  # buffered meanwhile
    tracker.on_snapshot(SnapshotReply("p", 1, 5, FP, [TierKeys("l1", KEYS[:5])]), 0.5)
    assert tracker.state is SyncState.SYNCED and tracker.last_seq == 6
    assert index.prefix_chunks("d0", KEYS) == 0 and index.worker_keys("d0") == 4
    # A heartbeat announcing a batch we never got is a gap too.
    tracker.on_message(Heartbeat("p", 1, 7, FP, 0.1), 0.6)
    assert tracker.state is SyncState.RESYNCING and tracker.counters.gaps == 2
    # A fingerprint change within one epoch is a lie: ignored.
    bad = EventBatch("p", 1, 8, msgspec.structs.replace(FP, model="x"), [])
    tracker.on_message(bad, 0.7)
    assert tracker.counters.invalid == 1


def test_tracker_expires_a_silent_worker() -> None:
    index = KVIndex()
    tracker = SourceTracker("d0", index, FAST)
    tracker.on_snapshot(SnapshotReply("p", 1, 0, FP, [TierKeys("l1", KEYS[:3])]), 0.0)
    tracker.on_message(Heartbeat("p", 1, 0, FP, 0.1), 0.0)
    tracker.tick(0.29)
    assert tracker.state is SyncState.SYNCED
    tracker.tick(0.31)
    assert tracker.state is SyncState.EXPIRED and index.worker_keys("d0") == 0
    tracker.on_message(Heartbeat("p", 1, 0, FP, 0.1), 1.0)
    assert tracker.state is SyncState.RESYNCING and tracker.wants_snapshot(1.0)


# -- end to end over ZMQ -------------------------------------------------------------------------
def test_events_flow_in_order_and_snapshot_fills_a_late_subscriber(
    closers: list[Callable[[], None]],
) -> None:
    pub = _publisher()
    closers.append(pub.close)
    pub.stored(KEYS[:5], "l1")  # before anyone subscribes: only a snapshot can carry this
    index = KVIndex()
    sub = _subscribe(index, closers, ("d0", pub))
    assert wait_until(lambda: index.prefix_chunks("d0", KEYS) == 5)
    for i in range(5, 50):
        pub.stored(KEYS[i : i + 1], "l1")
        if i % 7 == 0:
            pub.evicted(KEYS[i : i + 1], "l1")
            pub.stored(KEYS[i : i + 1], "l2")
    assert wait_until(lambda: index.prefix_chunks("d0", KEYS) == 50)
    assert index.tiers_of("d0", KEYS[7]) == ("l2",)
    stats = sub.stats()
    assert stats.states == {"d0": SyncState.SYNCED} and stats.totals.invalid == 0


def test_publisher_overflow_gap_is_healed_by_a_snapshot(closers: list[Callable[[], None]]) -> None:
    pub = _publisher(max_pending_keys=8, batch_interval=0.05)
    closers.append(pub.close)
    index = KVIndex()
    sub = _subscribe(index, closers, ("d0", pub))
    assert wait_until(lambda: sub.synced("d0"))
    for i in range(0, 96, 4):
        pub.stored(KEYS[i : i + 4], "l1")  # far more than 8 keys per batch interval
    assert pub.stats().dropped_keys > 0
    assert wait_until(lambda: index.prefix_chunks("d0", KEYS) == 96)
    assert sub.stats().totals.gaps >= 1 and sub.stats().totals.resyncs >= 2


def test_resync_after_publisher_restart(closers: list[Callable[[], None]]) -> None:
    port = free_port()
    pub = _publisher(port)
    index = KVIndex()
    sub = _subscribe(index, closers, ("d0", pub))
    pub.stored(KEYS[:6], "l1")
    assert wait_until(lambda: index.prefix_chunks("d0", KEYS) == 6)
    pub.close()
    restarted = _publisher(port)  # same endpoints, new epoch, an empty cache plus new keys
    closers.append(restarted.close)
    restarted.stored(KEYS[:2], "l2")
    assert wait_until(lambda: sub.stats().totals.restarts == 1 and sub.synced("d0"))
    assert wait_until(lambda: index.prefix_chunks("d0", KEYS) == 2)
    assert index.worker_keys("d0") == 2 and index.tiers_of("d0", KEYS[0]) == ("l2",)


def test_sources_added_and_removed_at_run_time(closers: list[Callable[[], None]]) -> None:
    first, later = _publisher(), _publisher()
    closers += [first.close, later.close]
    index = KVIndex()
    sub = _subscribe(index, closers, ("d0", first))
    first.stored(KEYS[:3], "l1")
    later.stored(KEYS[:4], "l2")  # before it is followed: only its snapshot carries this
    assert wait_until(lambda: index.worker_keys("d0") == 3)
    d0 = EventSource("d0", first.endpoint, first.snapshot_endpoint)
    d1 = EventSource("d1", later.endpoint, later.snapshot_endpoint)
    sub.set_sources([d0, d1])
    assert wait_until(lambda: index.prefix_chunks("d1", KEYS) == 4 and sub.synced("d1"))
    later.stored(KEYS[4:6], "l1")
    assert wait_until(lambda: index.prefix_chunks("d1", KEYS) == 6)
    received = sub.stats().totals.events
    sub.set_sources([d1])  # d0 leaves: its entries at once, and its later events never land
    assert index.worker_keys("d0") == 0 and set(sub.stats().states) == {"d1"}
    first.stored(KEYS[10:20], "l1")
    later.stored(KEYS[6:7], "l1")
    assert wait_until(lambda: index.prefix_chunks("d1", KEYS) == 7)
    assert index.worker_keys("d0") == 0
    assert sub.stats().totals.events >= received, "a removed source's counts are kept"
    with pytest.raises(ValueError, match="twice"):
        sub.set_sources([d1, d1])


def test_heartbeat_expiry_drops_the_worker(closers: list[Callable[[], None]]) -> None:
    pub = _publisher()
    keeper = _publisher()
    closers.append(keeper.close)
    index = KVIndex()
    sub = _subscribe(index, closers, ("d0", pub), ("d1", keeper))
    pub.stored(KEYS[:3], "l1")
    keeper.stored(KEYS[:3], "l1")
    assert wait_until(lambda: index.worker_keys("d0") == 3 and index.worker_keys("d1") == 3)
    pub.close()
    assert wait_until(lambda: sub.stats().states["d0"] is SyncState.EXPIRED)
    assert index.worker_keys("d0") == 0 and index.prefix_chunks("d1", KEYS) == 3


def test_flood_keeps_the_index_bounded(closers: list[Callable[[], None]]) -> None:
    fp = msgspec.structs.replace(FP, chunk_size=1)
    keys = chunk_keys(chain_root(fp), list(range(20_000)), 1)
    pub = _publisher(fp=fp)
    closers.append(pub.close)
    index = KVIndex(max_keys=1000)
    sub = _subscribe(index, closers, ("d0", pub))
    for start in range(0, len(keys), 500):
        pub.stored(keys[start : start + 500], "l1")
    assert wait_until(lambda: index.tiers_of("d0", keys[-1]) == ("l1",), timeout=30)
    assert len(index) <= 1000 and index.stats().evicted_keys >= 19_000 - 1000
    assert sub.stats().totals.invalid == 0


def test_garbage_from_a_peer_is_counted_and_ignored(closers: list[Callable[[], None]]) -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    rogue = ctx.socket(zmq.PUB)
    rogue.setsockopt(zmq.LINGER, 0)
    port = rogue.bind_to_random_port("tcp://127.0.0.1")
    closers.append(rogue.close)
    index = KVIndex()
    source = EventSource("d0", f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{free_port()}")
    sub = KVEventSubscriber([source], index, FAST, poll_interval=0.01).start()
    closers.append(sub.close)
    good = encode(Heartbeat("p", 1, 0, FP, 0.1))

    def hammer() -> bool:
        rogue.send_multipart([TOPIC, b"\xc1"])
        rogue.send_multipart([TOPIC, b"x", b"y"])
        rogue.send_multipart([TOPIC, good])
        return sub.stats().totals.invalid >= 2 and sub.stats().states["d0"] is SyncState.RESYNCING

    assert wait_until(hammer)
    assert len(index) == 0
