"""End-to-end pushes between real processes on loopback, over both channels."""

from __future__ import annotations

import random
import time

import pytest

from lmcache_disagg.transfer.errors import TransferError
from lmcache_disagg.transfer.receiver import KVReceiver
from lmcache_disagg.transfer.sender import KVSender
from lmcache_disagg.transfer.state import PushState, RecvState
from tests.transfer.utils import (
    CHANNELS,
    FP,
    FP_FIELDS,
    chunk_data,
    chunk_key,
    chunk_plan,
    make_config,
    peer_process,
    sender_spec,
    wait_until,
)

SENDER = "tests.transfer.sender_main"
RECEIVER = "tests.transfer.receiver_main"


@pytest.fixture(params=CHANNELS)
def channel(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def receiver(channel: str):  # type: ignore[no-untyped-def]
    rx = KVReceiver(make_config(channel, pool_size=FP.page_bytes * 256), FP)
    rx.start()
    assert rx.channel_kind == channel
    yield rx
    rx.shutdown()


def make_transfers(rng: random.Random, prefix: str, count: int) -> list[dict[str, int | str]]:
    return [
        {
            "id": f"{prefix}-{i}",
            "seed": rng.randrange(1 << 30),
            "n_chunks": rng.randint(1, 4),
            "last_tokens": rng.randint(1, FP.chunk_size),
        }
        for i in range(count)
    ]


def assert_received(rx: KVReceiver, transfers: list[dict[str, int | str]]) -> None:
    for t in transfers:
        tid, seed = str(t["id"]), int(t["seed"])
        state = rx.poll(tid)
        assert state.state is RecvState.COMPLETE, (tid, state)
        chunks = rx.chunks(tid)
        plan = chunk_plan(seed, int(t["n_chunks"]), int(t["last_tokens"]))
        assert [c.index for c in chunks] == list(range(len(plan)))
        for chunk, (nbytes, ntok) in zip(chunks, plan, strict=True):
            assert chunk.num_tokens == ntok
            assert chunk.key == chunk_key(seed, chunk.index)
            assert chunk.data.numel() == nbytes
            assert bool((chunk.data == chunk_data(seed, chunk.index, nbytes)).all()), (tid, chunk)
        rx.release(tid)
        assert rx.poll(tid).state is RecvState.UNKNOWN


def test_random_chunk_sets_arrive_byte_identical(channel: str, receiver: KVReceiver) -> None:
    transfers = make_transfers(random.Random(1), "solo", 6)
    transfers.append({"id": "full-last", "seed": 7, "n_chunks": 3, "last_tokens": FP.chunk_size})
    transfers.append({"id": "one-token", "seed": 8, "n_chunks": 1, "last_tokens": 1})
    spec = sender_spec(receiver.endpoint, channel, transfers)
    with peer_process(SENDER, spec) as child:
        assert child.read_event()["channel"] == channel
        result = child.read_event()
    assert result["errors"] == {}
    assert all(state == ["DONE", ""] for state in result["results"].values()), result
    assert result["pages_in_use"] == 0
    assert_received(receiver, transfers)
    assert receiver.occupancy() == 0


def test_64_transfers_interleaved_from_4_senders(channel: str, receiver: KVReceiver) -> None:
    rng = random.Random(2)
    groups = [make_transfers(rng, f"s{n}", 16) for n in range(4)]
    children = [
        peer_process(SENDER, sender_spec(receiver.endpoint, channel, g, interleave=True))
        for g in groups
    ]
    procs = [c.__enter__() for c in children]
    try:
        results = []
        for proc in procs:
            assert proc.read_event()["channel"] == channel
        for proc in procs:
            results.append(proc.read_event())
    finally:
        for c in children:
            c.__exit__(None, None, None)
    for result in results:
        assert result["errors"] == {}
        assert all(state == ["DONE", ""] for state in result["results"].values()), result
    for group in groups:
        assert_received(receiver, group)
    assert receiver.occupancy() == 0
    assert receiver.metrics.failures("checksum") == 0


def test_sender_killed_mid_transfer_frees_at_ttl(channel: str) -> None:
    ttl = 1.0
    rx = KVReceiver(make_config(channel, reservation_ttl=ttl), FP)
    rx.start()
    try:
        transfers = [{"id": "doomed", "seed": 3, "n_chunks": 4, "last_tokens": 5}]
        spec = sender_spec(rx.endpoint, channel, transfers, hang_after=2)
        with peer_process(SENDER, spec) as child:
            child.read_event()
            assert child.read_event()["event"] == "hung"
            assert wait_until(lambda: rx.poll("doomed").chunks_received == 2, 10)
            assert rx.occupancy() == 4
            child.kill()
        killed_at = time.monotonic()
        assert wait_until(lambda: rx.occupancy() == 0, ttl * 10)
        assert time.monotonic() - killed_at < ttl * 10
        state = rx.poll("doomed")
        assert state.state is RecvState.FAILED and state.reason == "ttl_expired"
        # The pool serves again.
        fresh = [{"id": "after", "seed": 4, "n_chunks": 2, "last_tokens": 3}]
        with peer_process(SENDER, sender_spec(rx.endpoint, channel, fresh)) as child:
            child.read_event()
            assert child.read_event()["results"] == {"after": ["DONE", ""]}
        assert_received(rx, fresh)
        assert rx.occupancy() == 0
    finally:
        rx.shutdown()


def test_receiver_killed_mid_transfer_sender_errors_within_deadline(channel: str) -> None:
    deadline = 1.5
    config = make_config(channel, push_deadline=deadline)
    spec = {
        "config": {**config.model_dump(mode="json"), "listen_port": 0},
        "fingerprint": FP_FIELDS,
    }
    tx = KVSender(config, FP)
    tx.start()
    try:
        with peer_process(RECEIVER, spec) as child:
            endpoint = child.read_event()["endpoint"]
            push = tx.open(endpoint, "orphan", 4)
            page = tx.acquire_page(1.0)
            push.write(0, page, FP.page_bytes, FP.chunk_size, b"k0")
            child.kill()
            started = time.monotonic()
            for index in range(1, 4):
                page = tx.acquire_page(deadline)
                push.write(index, page, FP.page_bytes, FP.chunk_size, b"k")
            push.finish()
            assert wait_until(lambda: push.status().state is not PushState.PENDING, deadline * 10)
            assert time.monotonic() - started < deadline * 10
        status = push.status()
        assert status.state is PushState.FAILED and status.reason
        assert wait_until(lambda: tx.send_pool.in_use() == 0, 5)
        with pytest.raises(TransferError):
            tx.open(endpoint, "after-death", 1)
    finally:
        tx.shutdown()


def test_nixl_with_its_own_progress_thread_still_delivers() -> None:
    """``nixl_progress_thread: true`` (off by default) on both ends: same bytes, same outcome."""
    rx = KVReceiver(
        make_config("nixl", pool_size=FP.page_bytes * 64, nixl_progress_thread=True), FP
    )
    rx.start()
    try:
        assert rx.channel_kind == "nixl"
        transfers = make_transfers(random.Random(5), "prog", 4)
        spec = sender_spec(rx.endpoint, "nixl", transfers, config={"nixl_progress_thread": True})
        with peer_process(SENDER, spec) as child:
            assert child.read_event()["channel"] == "nixl"
            result = child.read_event()
        assert result["errors"] == {}
        assert all(state == ["DONE", ""] for state in result["results"].values()), result
        assert_received(rx, transfers)
        assert rx.occupancy() == 0
    finally:
        rx.shutdown()
