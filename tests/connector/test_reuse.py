"""PD with reuse: D's receiver answers a reservation with the leading chunks its own chunk store
holds (pinned under the transfer's lease), and P pushes only the others. Real sender, receiver
and store in one process, over loopback TCP."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from lmcache_disagg.connector.reuse import StoreHeld
from lmcache_disagg.transfer.receiver import KVReceiver
from lmcache_disagg.transfer.sender import KVSender
from lmcache_disagg.transfer.state import PushState, RecvState
from lmcache_disagg.transfer.store import ChunkStore, NullStoreMetrics
from tests.store.utils import CHUNK, FP, chain, chunk_bytes, root_of, settings, store_prompt, tokens
from tests.transfer.utils import make_config, wait_until

PROMPT = tokens(3 * CHUNK + 100)


@pytest.fixture
def store() -> Iterator[ChunkStore]:
    chunk_store = ChunkStore(settings(), FP, NullStoreMetrics())
    chunk_store.start()
    yield chunk_store
    chunk_store.close(timeout=5.0)


@pytest.fixture
def pair(store: ChunkStore) -> Iterator[tuple[KVReceiver, KVSender]]:
    config = make_config("tcp", pool_size=FP.page_bytes * 16, send_buffer_size=FP.page_bytes * 8)
    rx = KVReceiver(config, FP, held=StoreHeld(store, root_of(), CHUNK))
    rx.start()
    tx = KVSender(config, FP)
    tx.start()
    yield rx, tx
    tx.shutdown()
    rx.shutdown()


def received_bytes(rx: KVReceiver) -> float:
    value = rx.metrics.registry.get_sample_value(
        "lmcache_disagg_transfer_bytes_total", {"side": "recv"}
    )
    return value or 0.0


def push_missing(tx: KVSender, target: str, tid: str) -> tuple[int, PushState]:
    """Open a push of PROMPT with its keys, write only the chunks D lacks, finish."""
    keys = chain(root_of(), PROMPT)
    push = tx.open(target, tid, len(keys), keys)
    for index in range(push.held, len(keys)):
        ids = PROMPT[index * CHUNK : index * CHUNK + CHUNK]
        data = chunk_bytes(ids)
        page = tx.acquire_page(1.0)
        page.data[: data.numel()].copy_(data)
        push.write(index, page, data.numel(), len(ids), keys[index])
    push.finish()
    assert wait_until(lambda: push.status().state is not PushState.PENDING, 5)
    return push.held, push.status().state


def test_held_leading_chunks_are_not_pushed_and_come_from_the_store(
    store: ChunkStore, pair: tuple[KVReceiver, KVSender]
) -> None:
    rx, tx = pair
    store_prompt(store, PROMPT[: 2 * CHUNK])  # D holds the first two chunks
    held, state = push_missing(tx, rx.endpoint, "t1")
    assert (held, state) == (2, PushState.DONE)
    assert rx.poll("t1").state is RecvState.COMPLETE
    chunks = rx.chunks("t1")
    keys = chain(root_of(), PROMPT)
    assert [c.held for c in chunks] == [True, True, False, False]
    assert [c.key for c in chunks] == keys
    # Only the two chunks D lacked crossed the wire.
    assert received_bytes(rx) == chunk_bytes(PROMPT[2 * CHUNK :]).numel()
    assert store.pinned_chunks() == 2 and store.leases() == 1
    pages = StoreHeld(store, root_of(), CHUNK).pages("t1", 2)
    for index, page in enumerate(pages):
        expected = chunk_bytes(PROMPT[index * CHUNK : index * CHUNK + CHUNK])
        assert bool((page[: expected.numel()] == expected).all())
    rx.release("t1")
    assert store.pinned_chunks() == 0 and store.leases() == 0
    assert rx.occupancy() == 0


def test_a_held_chunk_cannot_be_written_and_cancel_releases_the_lease(
    store: ChunkStore, pair: tuple[KVReceiver, KVSender]
) -> None:
    rx, tx = pair
    store_prompt(store, PROMPT[:CHUNK])
    keys = chain(root_of(), PROMPT)
    push = tx.open(rx.endpoint, "t2", len(keys), keys)
    assert push.held == 1
    assert store.pinned_chunks() == 1
    page = tx.acquire_page(1.0)
    with pytest.raises(ValueError, match="written twice"):
        push.write(0, page, FP.page_bytes, CHUNK, keys[0])
    push.cancel()
    assert wait_until(lambda: rx.occupancy() == 0, 5)
    assert store.pinned_chunks() == 0 and store.leases() == 0
    assert tx.pages_in_use() == 0


def test_nothing_held_pushes_everything(
    store: ChunkStore, pair: tuple[KVReceiver, KVSender]
) -> None:
    rx, tx = pair
    held, state = push_missing(tx, rx.endpoint, "t3")
    assert (held, state) == (0, PushState.DONE)
    assert not any(c.held for c in rx.chunks("t3"))
    assert received_bytes(rx) == 3 * FP.page_bytes + chunk_bytes(PROMPT[3 * CHUNK :]).numel()
    rx.release("t3")
    assert store.pinned_chunks() == 0 and store.leases() == 0
