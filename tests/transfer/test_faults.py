"""Transport faults on the TCP data path, injected by tests.transfer.faultproxy.

For every fault: a corrupted chunk is never COMPLETE, the failure is counted by reason, the
sender learns the outcome within its deadline, and both pools drain to 0.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from lmcache_disagg.transfer.receiver import KVReceiver
from lmcache_disagg.transfer.sender import KVSender
from lmcache_disagg.transfer.state import PushState, RecvState
from lmcache_disagg.vllm_server import free_port
from tests.transfer.faultproxy import ArmedFaultProxy
from tests.transfer.utils import FP, chunk_data, make_config, wait_until

N_CHUNKS = 3
DEADLINE = 2.0


@pytest.fixture
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[KVReceiver, KVSender, ArmedFaultProxy]]:
    fault, delay = request.param
    data_port = free_port()
    proxy = ArmedFaultProxy(data_port)
    if fault != "none":
        proxy.arm(fault, skip=1, delay=delay)  # the second chunk frame
    config = make_config(
        "tcp", reservation_ttl=3.0, data_port=data_port, advertised_data_port=proxy.port
    )
    rx = KVReceiver(config, FP)
    rx.start()
    tx = KVSender(make_config("tcp", push_deadline=DEADLINE), FP)
    tx.start()
    yield rx, tx, proxy
    tx.shutdown()
    proxy.close()
    rx.shutdown()


def push(tx: KVSender, rx: KVReceiver, tid: str) -> tuple[PushState, str, float]:
    handle = tx.open(rx.endpoint, tid, N_CHUNKS)
    started = time.monotonic()
    for i in range(N_CHUNKS):
        page = tx.acquire_page(DEADLINE)
        page.data.copy_(chunk_data(11, i, FP.page_bytes))
        handle.write(i, page, FP.page_bytes, FP.chunk_size, b"k%d" % i)
    handle.finish()
    status = handle.wait(DEADLINE * 3)
    return status.state, status.reason, time.monotonic() - started


def assert_drains(rx: KVReceiver, tx: KVSender, tid: str) -> None:
    if rx.poll(tid).state is not RecvState.UNKNOWN:
        rx.release(tid)
    assert wait_until(lambda: rx.occupancy() == 0, 10)
    assert wait_until(lambda: tx.send_pool.in_use() == 0, 10)


@pytest.mark.parametrize("pair", [("flip", 0.0)], indirect=True)
def test_bit_flip_fails_the_transfer_never_loads(
    pair: tuple[KVReceiver, KVSender, ArmedFaultProxy],
) -> None:
    rx, tx, proxy = pair
    state, reason, _elapsed = push(tx, rx, "flip")
    assert sum(proxy.applied.values()) == 1
    assert (state, reason) == (PushState.FAILED, "checksum")
    assert rx.poll("flip").state is RecvState.FAILED
    assert rx.metrics.failures("checksum") == 1
    assert_drains(rx, tx, "flip")
    # The connection survives a payload checksum failure: the next push works.
    assert push(tx, rx, "after")[0] is PushState.DONE
    assert_drains(rx, tx, "after")


@pytest.mark.parametrize("pair", [("duplicate", 0.0)], indirect=True)
def test_duplicate_frame_is_ignored(pair: tuple[KVReceiver, KVSender, ArmedFaultProxy]) -> None:
    rx, tx, proxy = pair
    state, _reason, _ = push(tx, rx, "dup")
    assert sum(proxy.applied.values()) == 1 and state is PushState.DONE
    assert rx.poll("dup").state is RecvState.COMPLETE
    for chunk in rx.chunks("dup"):
        assert bool((chunk.data == chunk_data(11, chunk.index, FP.page_bytes)).all())
    assert wait_until(lambda: rx.metrics.failures("duplicate_chunk") == 1, 5)
    assert_drains(rx, tx, "dup")


@pytest.mark.parametrize("pair", [("drop", 0.0)], indirect=True)
def test_connection_dropped_mid_chunk(pair: tuple[KVReceiver, KVSender, ArmedFaultProxy]) -> None:
    rx, tx, proxy = pair
    state, reason, elapsed = push(tx, rx, "drop")
    assert sum(proxy.applied.values()) == 1
    assert state is PushState.FAILED and reason, reason
    assert elapsed < DEADLINE * 10
    assert wait_until(lambda: rx.poll("drop").state is RecvState.FAILED, 10)
    assert_drains(rx, tx, "drop")
    # A fresh data connection is made for the next push.
    again = push(tx, rx, "again")
    assert again[0] is PushState.DONE, again
    assert_drains(rx, tx, "again")


@pytest.mark.parametrize("pair", [("delay", DEADLINE * 2)], indirect=True)
def test_delay_beyond_the_deadline(pair: tuple[KVReceiver, KVSender, ArmedFaultProxy]) -> None:
    rx, tx, _proxy = pair
    state, reason, elapsed = push(tx, rx, "slow")
    assert (state, reason) == (PushState.FAILED, "deadline")
    assert elapsed < DEADLINE * 10
    # The sender cancels on its deadline: D fails the transfer and frees the pages.
    assert wait_until(lambda: rx.poll("slow").state is RecvState.FAILED, 10)
    assert_drains(rx, tx, "slow")
