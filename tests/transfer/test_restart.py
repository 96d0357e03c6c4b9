"""D restarted on the same port while P keeps running: P's cached session (control socket, data
connection or NIXL agent metadata) belongs to the dead process, and the next push must
handshake with the new one instead of failing or writing into stale pool descriptors."""

from __future__ import annotations

import pytest

from lmcache_disagg.transfer.receiver import KVReceiver
from lmcache_disagg.transfer.sender import KVSender
from lmcache_disagg.transfer.state import PushState, RecvState
from lmcache_disagg.vllm_server import free_port
from tests.transfer.utils import CHANNELS, FP, chunk_data, chunk_key, make_config

N_CHUNKS = 2


def _push(tx: KVSender, endpoint: str, tid: str, seed: int) -> tuple[PushState, str]:
    handle = tx.open(endpoint, tid, N_CHUNKS)
    for index in range(N_CHUNKS):
        page = tx.acquire_page(2)
        page.data[: FP.page_bytes].copy_(chunk_data(seed, index, FP.page_bytes))
        handle.write(index, page, FP.page_bytes, FP.chunk_size, chunk_key(seed, index))
    handle.finish()
    status = handle.wait(5)
    return status.state, status.reason


def _check_received(rx: KVReceiver, tid: str, seed: int) -> None:
    assert rx.wait(tid, 5).state is RecvState.COMPLETE
    for chunk in rx.chunks(tid):
        assert chunk.key == chunk_key(seed, chunk.index)
        assert bool((chunk.data == chunk_data(seed, chunk.index, FP.page_bytes)).all())
    rx.release(tid)


@pytest.mark.parametrize("channel", CHANNELS)
def test_pushes_after_d_restarts_on_the_same_port(channel: str) -> None:
    d_config = make_config(channel, listen_port=free_port())
    rx = KVReceiver(d_config, FP)
    rx.start()
    tx = KVSender(make_config(channel), FP)
    tx.start()
    try:
        assert _push(tx, rx.endpoint, "before", seed=1) == (PushState.DONE, "")
        _check_received(rx, "before", seed=1)
        rx.shutdown()
        rx = KVReceiver(d_config, FP)  # a new process would look the same: new pool, new session
        rx.start()
        for n in range(3):
            assert _push(tx, rx.endpoint, f"after-{n}", seed=10 + n) == (PushState.DONE, "")
            _check_received(rx, f"after-{n}", seed=10 + n)
        assert rx.occupancy() == 0
        assert tx.send_pool.in_use() == 0
    finally:
        tx.shutdown()
        rx.shutdown()
