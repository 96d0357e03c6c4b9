"""Hypothesis fuzzing of the TCP frame parser and the control plane of a live receiver.

Every example talks to one receiver over real sockets. Invariants: no crash (the receiver keeps
answering), no hang (each bad connection is closed once we stop sending), bad input is counted, and
no byte outside the one open reservation ever changes (the pool is poisoned up front).
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmcache_disagg.transfer.channels.frames import header_checksum
from lmcache_disagg.transfer.protocol import (
    FRAME_CHECKSUM_SPAN,
    FRAME_CHUNK,
    FRAME_HEADER,
    FRAME_HEADER_SIZE,
    FRAME_MAGIC,
    PROTOCOL_VERSION,
    Cancel,
    Finish,
    Hello,
    HelloReply,
    Reserve,
    encode,
)
from lmcache_disagg.transfer.receiver import KVReceiver
from tests.transfer.utils import FP, RawPeer, make_config, wait_closed

POISON = 0xAB
FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


class Target:
    def __init__(self) -> None:
        config = make_config("tcp", pool_size=FP.page_bytes * 8, reservation_ttl=3600)
        self.rx = KVReceiver(config, FP)
        self.rx.pool.pages.fill_(POISON)
        self.rx.start()
        self.peer = RawPeer(self.rx.endpoint)
        reply = self.peer.reserve("fuzz-target", 2, ttl=3600)
        self.handle = reply.handle
        self.pages = list(reply.pages)

    def outside_untouched(self) -> bool:
        mask = [i for i in range(self.rx.pool.n_pages) if i not in self.pages]
        return bool((self.rx.pool.pages[mask] == POISON).all())

    def still_serving(self) -> bool:
        probe = RawPeer(self.rx.endpoint)
        probe.close()
        return isinstance(probe.hello, HelloReply)

    def close(self) -> None:
        self.peer.close()
        self.rx.shutdown()


@pytest.fixture(scope="module")
def target() -> Iterator[Target]:
    t = Target()
    yield t
    t.close()


def send_and_close(target: Target, data: bytes) -> bool:
    sock = target.peer.data_conn()
    # The receiver may close before reading everything; EOF means a truncated frame can't wait.
    with contextlib.suppress(OSError):
        sock.sendall(data)
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
    closed = wait_closed(sock)
    sock.close()
    return closed


@FUZZ
@given(st.binary(min_size=0, max_size=4096))
def test_random_bytes(target: Target, data: bytes) -> None:
    before = target.rx.metrics.failures("protocol")
    assert send_and_close(target, data)
    if len(data) >= FRAME_HEADER_SIZE:
        assert target.rx.metrics.failures("protocol") == before + 1
    assert target.outside_untouched()


@FUZZ
@given(
    handle=st.one_of(st.integers(0, 2**64 - 1), st.just(-1)),
    index=st.integers(0, 2**32 - 1),
    nbytes=st.one_of(st.integers(0, 2**64 - 1), st.integers(0, FP.page_bytes + 2)),
    num_tokens=st.integers(0, 2**32 - 1),
    key_len=st.integers(0, 2**16 - 1),
    payload=st.binary(max_size=256),
    truncate=st.integers(0, 300),
    valid_header_checksum=st.booleans(),
)
def test_structured_headers(
    target: Target,
    handle: int,
    index: int,
    nbytes: int,
    num_tokens: int,
    key_len: int,
    payload: bytes,
    truncate: int,
    valid_header_checksum: bool,
) -> None:
    if handle == -1:
        handle = target.handle
        index = index % 4  # near the reservation: in and just out of range
    fields = (FRAME_MAGIC, PROTOCOL_VERSION, FRAME_CHUNK, 0, handle, index, nbytes)
    header = FRAME_HEADER.pack(*fields, num_tokens, key_len, 0, 0, b"k")
    if valid_header_checksum:  # get past the header check to exercise the bounds checks
        key_at = FRAME_CHECKSUM_SPAN + 8
        checksum = header_checksum(header, header[key_at : key_at + min(key_len, 64)])
        header = FRAME_HEADER.pack(*fields, num_tokens, key_len, 0, checksum, b"k")
    frame = (header + payload)[: max(0, len(header) + len(payload) - truncate)]
    assert send_and_close(target, frame)
    assert target.outside_untouched()
    assert target.rx.occupancy() == 2


@FUZZ
@given(st.lists(st.binary(max_size=512), min_size=1, max_size=3))
def test_control_random_frames(target: Target, frames: list[bytes]) -> None:
    sock = target.peer.sock
    sock.send_multipart(frames)
    assert target.still_serving()
    assert target.outside_untouched()


@FUZZ
@given(
    kind=st.sampled_from(["reserve", "finish", "cancel", "hello"]),
    n=st.integers(-(2**40), 2**40),
    ttl=st.floats(allow_nan=True, allow_infinity=True),
    tid=st.text(max_size=300),
    handle=st.integers(0, 2**63),
    session=st.binary(max_size=20),
)
def test_control_messages(
    target: Target, kind: str, n: int, ttl: float, tid: str, handle: int, session: bytes
) -> None:
    peer = target.peer
    messages = {
        "reserve": Reserve(1, session or peer.session, tid, n, ttl),
        "finish": Finish(1, session or peer.session, handle, n),
        "cancel": Cancel(1, session, handle),
        "hello": Hello(1, PROTOCOL_VERSION + (n % 3), FP, session),
    }
    try:
        payload = encode(messages[kind])
    except (OverflowError, msgspec.EncodeError):
        return
    peer.send_raw(payload)
    assert peer.sock.poll(5000), "no reply (the control thread hung?)"
    peer.sock.recv()
    for holder in target.rx.transfer_ids():
        if holder != "fuzz-target":
            target.rx.release(holder)
    assert target.outside_untouched()
    assert target.rx.occupancy() == 2


def test_huge_declared_length_is_refused_without_reading(target: Target) -> None:
    before = target.rx.metrics.failures("protocol")
    fields = (FRAME_MAGIC, PROTOCOL_VERSION, FRAME_CHUNK, 0, target.handle, 0, 2**63, 1, 1)
    header = FRAME_HEADER.pack(*fields, 0, 0, b"k")
    header = FRAME_HEADER.pack(*fields, 0, header_checksum(header, b"k"), b"k")
    sock = target.peer.data_conn()
    sock.sendall(header)
    assert wait_closed(sock)  # closed without us sending EOF or the payload
    sock.close()
    assert target.rx.metrics.failures("protocol") == before + 1
