"""Reservation, fingerprint, auth, allowlist, duplicates, integrity and probe behaviour."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import pytest

from lmcache_disagg.transfer.errors import (
    AuthenticationFailed,
    DuplicateTransfer,
    FingerprintMismatch,
    NoRoom,
    PeerUnreachable,
    TargetNotAllowed,
)
from lmcache_disagg.transfer.probe import probe
from lmcache_disagg.transfer.protocol import Cancel, ErrorReply, LayoutFingerprint, ReserveReply
from lmcache_disagg.transfer.receiver import KVReceiver
from lmcache_disagg.transfer.sender import KVSender
from lmcache_disagg.transfer.state import PushState, RecvState
from tests.transfer.utils import (
    FP,
    FP_FIELDS,
    RawPeer,
    make_config,
    peer_process,
    sender_spec,
    wait_closed,
    wait_until,
)

SECRET = "s3cret-cluster-key-do-not-log"
POISON = 0xAB


@pytest.fixture
def rx() -> Iterator[KVReceiver]:
    receiver = KVReceiver(make_config("tcp", pool_size=FP.page_bytes * 4), FP)
    receiver.pool.pages.fill_(POISON)
    receiver.start()
    yield receiver
    receiver.shutdown()


@pytest.fixture
def tx() -> Iterator[KVSender]:
    sender = KVSender(make_config("tcp"), FP)
    sender.start()
    yield sender
    sender.shutdown()


def push_all(tx: KVSender, target: str, tid: str, n: int) -> PushState:
    push = tx.open(target, tid, n)
    for i in range(n):
        page = tx.acquire_page(1.0)
        page.data.fill_(i)
        push.write(i, page, FP.page_bytes, FP.chunk_size, b"key")
    push.finish()
    assert wait_until(lambda: push.status().state is not PushState.PENDING, 5)
    return push.status().state


def test_full_pool_refuses_within_deadline_and_serves_after_release(
    rx: KVReceiver, tx: KVSender
) -> None:
    assert push_all(tx, rx.endpoint, "a", 4) is PushState.DONE
    assert rx.occupancy() == 4
    started = time.monotonic()
    with pytest.raises(NoRoom, match="pool full"):
        tx.open(rx.endpoint, "b", 1)
    assert time.monotonic() - started < tx.config.reserve_timeout * 10
    with pytest.raises(NoRoom):  # more than the whole pool never waits
        tx.open(rx.endpoint, "huge", 5)
    rx.release("a")
    rx.release("a")  # idempotent
    assert rx.occupancy() == 0
    assert push_all(tx, rx.endpoint, "b", 1) is PushState.DONE
    assert tx.metrics.failures("no_room") == 2


def test_cancel_frees_the_reservation(rx: KVReceiver, tx: KVSender) -> None:
    push = tx.open(rx.endpoint, "c", 3)
    assert rx.occupancy() == 3
    push.cancel()
    push.cancel()
    assert wait_until(lambda: rx.occupancy() == 0, 5)
    assert push.status().state is PushState.FAILED
    assert rx.poll("c").state is RecvState.FAILED and rx.poll("c").reason == "cancelled"


@pytest.mark.parametrize(
    ("field", "value"), [("dtype", "float16"), ("chunk_size", 64), ("tp_rank", 1)]
)
def test_fingerprint_mismatch_names_the_field(rx: KVReceiver, field: str, value: object) -> None:
    other = LayoutFingerprint(**{**FP_FIELDS, field: value, "tp_size": 2})
    sender = KVSender(make_config("tcp"), other)
    sender.start()
    try:
        with pytest.raises(FingerprintMismatch, match=field) as info:
            sender.open(rx.endpoint, "fp", 1)
        assert field in info.value.fields
    finally:
        sender.shutdown()
    assert rx.occupancy() == 0


def test_duplicate_transfer_id_is_rejected(rx: KVReceiver, tx: KVSender) -> None:
    assert push_all(tx, rx.endpoint, "dup", 1) is PushState.DONE
    with pytest.raises(DuplicateTransfer):
        tx.open(rx.endpoint, "dup", 1)
    rx.release("dup")
    with pytest.raises(DuplicateTransfer):  # also after release: ids are single-use
        tx.open(rx.endpoint, "dup", 1)
    assert rx.occupancy() == 0


def test_duplicate_frames_and_writes_after_release_are_ignored(rx: KVReceiver) -> None:
    peer = RawPeer(rx.endpoint)
    try:
        reply = peer.reserve("raw", 2)
        assert isinstance(reply, ReserveReply)
        sock = peer.data_conn()
        first = bytes([1]) * FP.page_bytes
        sock.sendall(peer.chunk_frame(reply.handle, 0, first, FP.chunk_size))
        sock.sendall(peer.chunk_frame(reply.handle, 0, bytes([9]) * FP.page_bytes, 1))
        assert wait_until(lambda: rx.metrics.failures("duplicate_chunk") == 1, 5)
        sock.sendall(peer.chunk_frame(reply.handle, 1, bytes([2]) * 100, 3))
        assert peer.finish(reply.handle, 2).state == "COMPLETE"
        chunks = rx.chunks("raw")
        assert bytes(chunks[0].data.numpy()) == first and chunks[0].num_tokens == FP.chunk_size
        rx.release("raw")
        sock.sendall(peer.chunk_frame(reply.handle, 1, bytes([3]) * 100, 3))
        assert wait_until(lambda: rx.metrics.failures("write_after_release") == 1, 5)
        assert bool((rx.pool.pages == POISON).all()) is False  # the pages were written once
        assert rx.occupancy() == 0
        sock.close()
    finally:
        peer.close()


def test_corrupted_payload_fails_the_transfer(rx: KVReceiver) -> None:
    peer = RawPeer(rx.endpoint)
    try:
        reply = peer.reserve("flip", 2)
        sock = peer.data_conn()
        sock.sendall(peer.chunk_frame(reply.handle, 0, b"\x05" * 4096, 4))
        sock.sendall(peer.chunk_frame(reply.handle, 1, b"\x06" * 4096, 4, corrupt=True))
        finish = peer.finish(reply.handle, 2)
        assert finish.state == "FAILED" and finish.reason == "checksum"
        assert rx.poll("flip").state is RecvState.FAILED
        assert rx.metrics.failures("checksum") == 1
        rx.release("flip")
        assert rx.occupancy() == 0
        sock.close()
    finally:
        peer.close()


def test_frame_outside_reservation_is_refused_before_writing(rx: KVReceiver) -> None:
    peer = RawPeer(rx.endpoint)
    try:
        reply = peer.reserve("oob", 1)
        sock = peer.data_conn()
        sock.sendall(peer.chunk_frame(reply.handle, 1, b"\x07" * 64, 2))
        assert wait_closed(sock)
        assert rx.metrics.failures("protocol") == 1
        assert bool((rx.pool.pages == POISON).all())
        rx.release("oob")
    finally:
        peer.close()


def test_unauthenticated_sender_process_is_refused_and_writes_nothing() -> None:
    rx = KVReceiver(make_config("tcp", cluster_secret=SECRET), FP)
    rx.pool.pages.fill_(POISON)
    rx.start()
    try:
        transfers = [{"id": "intruder", "seed": 1, "n_chunks": 2, "last_tokens": 3}]
        with peer_process(
            "tests.transfer.sender_main", sender_spec(rx.endpoint, "tcp", transfers)
        ) as child:
            child.read_event()
            result = child.read_event()
        kind, message = result["errors"]["intruder"]
        assert kind == "AuthenticationFailed" and "cluster secret" in message
        wrong = KVSender(make_config("tcp", cluster_secret="wrong"), FP)
        wrong.start()
        try:
            with pytest.raises(AuthenticationFailed):
                wrong.open(rx.endpoint, "intruder2", 1)
        finally:
            wrong.shutdown()
        # A forged data connection (session never authenticated) is closed before any write.
        peer = RawPeer(rx.endpoint)
        reply = peer.reserve("forged", 1)
        assert isinstance(reply, ErrorReply) and reply.kind == "auth"
        sock = peer.data_conn()
        sock.sendall(peer.chunk_frame(12345, 0, b"\x01" * 64, 1))
        assert wait_closed(sock)
        peer.close()
        assert bool((rx.pool.pages == POISON).all())
        assert rx.occupancy() == 0
        # The right secret works (mutual HMAC), on the same receiver.
        good = KVSender(make_config("tcp", cluster_secret=SECRET), FP)
        good.start()
        try:
            assert push_all(good, rx.endpoint, "friend", 2) is PushState.DONE
        finally:
            good.shutdown()
    finally:
        rx.shutdown()


def test_sender_with_secret_refuses_receiver_without_one(rx: KVReceiver) -> None:
    sender = KVSender(make_config("tcp", cluster_secret=SECRET), FP)
    sender.start()
    try:
        with pytest.raises(AuthenticationFailed, match="prove"):
            sender.open(rx.endpoint, "x", 1)
    finally:
        sender.shutdown()


def test_allowlist(rx: KVReceiver) -> None:
    open_sender = KVSender(make_config("tcp"), FP)
    open_sender.start()
    try:
        with pytest.raises(TargetNotAllowed):
            open_sender.open("10.255.255.1:17555", "t", 1)
    finally:
        open_sender.shutdown()
    listed = KVSender(make_config("tcp", push_allowlist=("10.255.255.1:17555",)), FP)
    listed.start()
    try:
        with pytest.raises(TargetNotAllowed):  # loopback is not listed
            listed.open(rx.endpoint, "t", 1)
    finally:
        listed.shutdown()
    allowed = KVSender(make_config("tcp", push_allowlist=(rx.endpoint,)), FP)
    allowed.start()
    try:
        assert push_all(allowed, rx.endpoint, "listed", 1) is PushState.DONE
    finally:
        allowed.shutdown()


def test_unreachable_peer_errors_within_deadline(tx: KVSender) -> None:
    started = time.monotonic()
    with pytest.raises(PeerUnreachable):
        tx.open("127.0.0.1:9", "nobody", 1)
    budget = tx.config.connect_timeout + tx.config.handshake_timeout
    assert time.monotonic() - started < budget * 3


def test_probe() -> None:
    rx = KVReceiver(make_config("tcp", cluster_secret=SECRET), FP)
    rx.start()
    try:
        ok = probe(rx.endpoint, 2.0, cluster_secret=SECRET)
        assert ok.ok and ok.authenticated and ok.fingerprint == FP
        assert probe(rx.endpoint, 2.0, cluster_secret="nope").error == "auth"
        assert probe(rx.endpoint, 2.0).error == "auth"
        dead = probe("127.0.0.1:9", 0.3)
        assert not dead.ok and dead.error == "unreachable"
    finally:
        rx.shutdown()


def test_secret_never_reaches_logs_or_reprs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    config = make_config("tcp", cluster_secret=SECRET)
    assert SECRET not in repr(config) and SECRET not in str(config)
    rx = KVReceiver(config, FP)
    rx.start()
    try:
        wrong = KVSender(make_config("tcp", cluster_secret="other"), FP)
        wrong.start()
        with pytest.raises(AuthenticationFailed) as info:
            wrong.open(rx.endpoint, "t", 1)
        wrong.shutdown()
        assert SECRET not in str(info.value)
    finally:
        rx.shutdown()
    assert SECRET not in caplog.text


@pytest.mark.parametrize(
    ("rx_channel", "tx_channel", "expected"),
    [("auto", "auto", "nixl"), ("tcp", "auto", "tcp"), ("auto", "tcp", "tcp")],
)
def test_channel_auto_selection(rx_channel: str, tx_channel: str, expected: str) -> None:
    receiver = KVReceiver(make_config(rx_channel), FP)
    receiver.start()
    sender = KVSender(make_config(tx_channel), FP)
    sender.start()
    try:
        assert push_all(sender, receiver.endpoint, "auto", 2) is PushState.DONE
        assert sender.channel_for(receiver.endpoint) == expected
        selected = sender.metrics.registry.get_sample_value(
            "lmcache_disagg_transfer_channel_selected_total", {"side": "send", "channel": expected}
        )
        assert selected == 1
        receiver.release("auto")
    finally:
        sender.shutdown()
        receiver.shutdown()


def test_nixl_channel_refuses_a_tcp_only_receiver() -> None:
    receiver = KVReceiver(make_config("tcp"), FP)
    receiver.start()
    sender = KVSender(make_config("nixl"), FP)
    sender.start()
    try:
        with pytest.raises(PeerUnreachable, match="NIXL"):
            sender.open(receiver.endpoint, "n", 1)
    finally:
        sender.shutdown()
        receiver.shutdown()


def test_nixl_pages_of_a_cancelled_transfer_are_quarantined() -> None:
    from lmcache_disagg.transfer.receiver import NIXL_QUARANTINE

    receiver = KVReceiver(make_config("nixl"), FP)
    receiver.start()
    sender = KVSender(make_config("nixl"), FP)
    sender.start()
    try:
        push = sender.open(receiver.endpoint, "q", 2)
        page = sender.acquire_page(1.0)
        push.write(0, page, FP.page_bytes, FP.chunk_size, b"k")
        assert wait_until(lambda: receiver.poll("q").chunks_received == 1, 10)
        push.cancel()
        assert wait_until(lambda: receiver.poll("q").state is RecvState.FAILED, 10)
        # A late remote WRITE could still land: the pages stay out of the pool for a while.
        assert receiver.occupancy() == 2
        assert wait_until(lambda: receiver.occupancy() == 0, NIXL_QUARANTINE * 10)
    finally:
        sender.shutdown()
        receiver.shutdown()


def test_cancel_after_complete_keeps_the_data_for_the_connector(
    rx: KVReceiver, tx: KVSender
) -> None:
    push = tx.open(rx.endpoint, "kept", 1)
    page = tx.acquire_page(1.0)
    push.write(0, page, FP.page_bytes, FP.chunk_size, b"k")
    push.finish()
    assert push.wait(5).state is PushState.DONE
    push.cancel()
    # A late cancel straight from the wire (same session) must not free it either.
    session = tx._peers[rx.endpoint].session
    peer = RawPeer(rx.endpoint)
    try:
        assert peer.request(lambda rid: Cancel(rid, session, push.handle)).rid
    finally:
        peer.close()
    assert rx.poll("kept").state is RecvState.COMPLETE
    assert len(rx.chunks("kept")) == 1
    rx.release("kept")
    assert rx.occupancy() == 0
