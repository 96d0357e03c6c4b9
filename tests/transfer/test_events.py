"""KV events wire format and the worker-side publisher (real ZMQ sockets on loopback)."""

from __future__ import annotations

import msgspec
import pytest
import zmq

from lmcache_disagg.keys import chain_root, chunk_keys
from lmcache_disagg.transfer.event_publisher import (
    KVEventPublisher,
    PublisherSettings,
    snapshot_endpoint_for,
)
from lmcache_disagg.transfer.events import (
    MAX_BATCH_KEYS,
    TOPIC,
    ChunkEvicted,
    ChunkPromoted,
    ChunkStored,
    EventBatch,
    Heartbeat,
    SnapshotReply,
    SnapshotRequest,
    TierKeys,
    decode_pub,
    decode_snapshot,
    encode,
)
from lmcache_disagg.transfer.protocol import LayoutFingerprint

FP = LayoutFingerprint(
    model="m", dtype="float32", num_layers=2, num_kv_heads=2, head_dim=8, chunk_size=4,
    tp_rank=0, tp_size=1,
)  # fmt: skip
KEYS = chunk_keys(chain_root(FP), list(range(64)), FP.chunk_size)


def test_messages_round_trip() -> None:
    batch = EventBatch(
        "w", 7, 1, FP,
        [ChunkStored(KEYS[:2], "l1"), ChunkEvicted(KEYS[:1], "l1"), ChunkPromoted(KEYS[2:3], "l1", "l2")],
    )  # fmt: skip
    assert decode_pub(encode(batch)) == batch
    beat = Heartbeat("w", 7, 1, FP, 1.0)
    assert decode_pub(encode(beat)) == beat
    reply = SnapshotReply("w", 7, 3, FP, [TierKeys("l2", KEYS[:3])])
    assert decode_snapshot(encode(reply)) == reply
    assert decode_snapshot(encode(SnapshotRequest())) == SnapshotRequest()


def _raw_batch(**changes: object) -> bytes:
    fields = {"publisher": "w", "epoch": 1, "seq": 1, "fingerprint": FP, "events": []}
    fields.update(changes)
    return msgspec.msgpack.encode(["batch", *fields.values()])


@pytest.mark.parametrize(
    "payload",
    [
        b"\xc1garbage",
        msgspec.msgpack.encode(["nope", 1]),
        _raw_batch(events=[["stored", [b"short"], "l1"]]),  # key not 16 bytes
        _raw_batch(events=[["stored", [KEYS[0]], "l9"]]),  # unknown tier
        _raw_batch(events=[["stored", [], "l1"]]),  # empty key list
        _raw_batch(seq=0),  # batches count from 1
        _raw_batch(seq=-1),
        _raw_batch(publisher=""),
        _raw_batch(fingerprint=msgspec.structs.replace(FP, tp_rank=5)),  # out-of-range fingerprint
        _raw_batch(
            events=[["stored", [KEYS[0]] * (MAX_BATCH_KEYS // 2 + 1), "l1"]] * 2
        ),  # too many keys in one batch
    ],
)
def test_malformed_messages_are_refused(payload: bytes) -> None:
    with pytest.raises(ValueError):
        decode_pub(payload)


def test_snapshot_version_mismatch_names_the_fix() -> None:
    with pytest.raises(ValueError, match="upgrade"):
        decode_snapshot(encode(SnapshotRequest(version=99)))


def test_snapshot_endpoint_default() -> None:
    assert snapshot_endpoint_for("tcp://10.0.0.1:5557") == "tcp://10.0.0.1:5558"
    with pytest.raises(ValueError):
        snapshot_endpoint_for("tcp://host")
    with pytest.raises(ValueError):
        PublisherSettings("ipc:///x").validate()


def _sub(endpoint: str) -> zmq.Socket[bytes]:
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SUBSCRIBE, TOPIC)
    sock.setsockopt(zmq.RCVTIMEO, 5000)
    sock.connect(endpoint)
    return sock


def _next_batch(sock: zmq.Socket[bytes]) -> EventBatch:
    for _ in range(1000):
        topic, payload = sock.recv_multipart()
        assert topic == TOPIC
        message = decode_pub(payload)
        if isinstance(message, EventBatch):
            return message
    raise AssertionError("no batch")


def test_publisher_batches_in_order_with_consecutive_seq_and_answers_snapshots() -> None:
    settings = PublisherSettings("tcp://127.0.0.1:0", heartbeat_interval=0.05)
    pub = KVEventPublisher(settings, FP, publisher_id="w0").start()
    sub = _sub(pub.endpoint)
    try:
        # A subscriber joins asynchronously: wait for a heartbeat before relying on delivery.
        beat = decode_pub(sub.recv_multipart()[1])
        assert isinstance(beat, Heartbeat) and beat.seq == 0 and beat.fingerprint == FP
        pub.stored(KEYS[:3], "l1")
        pub.evicted(KEYS[:1], "l1")
        pub.promoted(KEYS[3:4], "l1", "l2")
        first = _next_batch(sub)
        assert first.seq == 1 and first.publisher == "w0" and first.epoch == pub.epoch
        assert [type(e) for e in first.events] == [ChunkStored, ChunkEvicted, ChunkPromoted]
        pub.stored(KEYS[4:5], "l2")
        assert _next_batch(sub).seq == 2

        dealer: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.RCVTIMEO, 5000)
        dealer.connect(pub.snapshot_endpoint)
        dealer.send(b"not msgpack")  # refused and counted, then a real request is answered
        dealer.send(encode(SnapshotRequest()))
        reply = decode_snapshot(dealer.recv())
        dealer.close()
        assert isinstance(reply, SnapshotReply) and reply.seq == 2
        tiers = {entry.tier: set(entry.keys) for entry in reply.tiers}
        assert tiers == {"l1": {KEYS[1], KEYS[2], KEYS[3]}, "l2": {KEYS[4]}}
        assert pub.stats().bad_requests == 1
    finally:
        sub.close()
        pub.close()


def test_pending_overflow_makes_a_deliberate_gap_and_the_key_set_stays_exact() -> None:
    settings = PublisherSettings("tcp://127.0.0.1:0", batch_interval=3600, max_pending_keys=4)
    pub = KVEventPublisher(settings, FP).start()
    sub = _sub(pub.endpoint)
    try:
        decode_pub(sub.recv_multipart()[1])  # first heartbeat: connected
        pub.stored(KEYS[:4], "l1")
        pub.stored(KEYS[4:6], "l1")  # over the bound: dropped from the stream, kept in the set
        assert pub.stats().dropped_keys == 2 and pub.tracked_keys() == 6
        dealer: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.RCVTIMEO, 5000)
        dealer.connect(pub.snapshot_endpoint)
        dealer.send(encode(SnapshotRequest()))  # flushes pending first, then answers
        reply = decode_snapshot(dealer.recv())
        dealer.close()
        batch = _next_batch(sub)
        assert batch.seq == 2, "seq 1 is skipped so every subscriber sees the loss"
        assert isinstance(reply, SnapshotReply) and reply.seq == 2
        assert set(reply.tiers[0].keys) == set(KEYS[:6])
    finally:
        sub.close()
        pub.close()


def test_tracked_keys_are_bounded() -> None:
    settings = PublisherSettings("tcp://127.0.0.1:0", max_tracked_keys=10)
    pub = KVEventPublisher(settings, FP)  # not started: recording needs no sockets
    pub.stored(KEYS, "l1")
    assert pub.tracked_keys() == 10


def test_bind_failure_is_an_error_not_a_hang() -> None:
    first = KVEventPublisher(PublisherSettings("tcp://127.0.0.1:0"), FP).start()
    try:
        clash = KVEventPublisher(PublisherSettings(first.endpoint, start_timeout=1.0), FP)
        with pytest.raises(OSError, match="cannot bind"):
            clash.start()
    finally:
        first.close()


def test_a_publisher_restarted_on_its_port_binds_again() -> None:
    """A worker restarted at once reuses its endpoints (zmq frees the old ones asynchronously)."""
    first = KVEventPublisher(PublisherSettings("tcp://127.0.0.1:0"), FP).start()
    endpoint, snapshot = first.endpoint, first.snapshot_endpoint
    first.close()
    for _ in range(20):
        again = KVEventPublisher(PublisherSettings(endpoint, snapshot), FP).start()
        assert (again.endpoint, again.snapshot_endpoint) == (endpoint, snapshot)
        again.close()
