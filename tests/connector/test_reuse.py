"""PD with reuse: D's receiver answers a reservation with the leading chunks its own chunk store
holds (pinned under the transfer's lease), and P pushes only the others. Real sender, receiver
and store in one process, over loopback TCP."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from lmcache_disagg.connector.device import SyncCopyEngine
from lmcache_disagg.connector.keys import chain_root
from lmcache_disagg.connector.loader import Loader
from lmcache_disagg.connector.pusher import Pusher
from lmcache_disagg.connector.reuse import StoreHeld
from lmcache_disagg.connector.stats import StatsRecorder
from lmcache_disagg.transfer.receiver import KVReceiver
from lmcache_disagg.transfer.sender import KVSender
from lmcache_disagg.transfer.state import PushState, RecvState
from lmcache_disagg.transfer.store import ChunkStore, NullStoreMetrics, StoreSettings
from tests.connector.test_push_load import D_BLOCKS, LOG, P_BLOCKS, config, load, push, spec
from tests.connector.test_push_load import PROMPT as PD_PROMPT
from tests.connector.utils import keys_for, make_kv, token_values
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


def test_pd_load_takes_held_chunks_from_ds_store_and_the_rest_from_the_push() -> None:
    p_kv, d_kv = make_kv(seed=1), make_kv(seed=2)
    fp = d_kv.fingerprint
    chunk = fp.chunk_size
    d_store = ChunkStore(
        StoreSettings(max_local_cpu_size=64 * fp.page_bytes, lease_ttl=30.0), fp, NullStoreMetrics()
    )
    d_store.start()
    # D holds the first two chunks of the prompt (as if an earlier request had stored them).
    keys = keys_for(d_kv, PD_PROMPT[:-1])
    parent = chain_root(fp)
    for index in range(2):
        page = d_store.reserve_page()
        assert page is not None
        data = token_values(p_kv, P_BLOCKS, index * chunk, index * chunk + chunk)
        raw = data.reshape(-1).view(torch.uint8)
        page[: raw.numel()].copy_(raw)
        ids = PD_PROMPT[index * chunk : index * chunk + chunk]
        d_store.commit(page, keys[index], parent, ids, raw.numel())
        parent = keys[index]
    held = StoreHeld(d_store, chain_root(fp), chunk)
    rx = KVReceiver(config(), fp, held=held)
    rx.start()
    d_stats, p_stats = StatsRecorder(), StatsRecorder()
    loader = Loader(
        config(), d_kv, rx, SyncCopyEngine(), d_stats, LOG, rx.extend, held_pages=held.pages
    )
    tx = KVSender(config(), p_kv.fingerprint)
    tx.start()
    pusher = Pusher(config(), p_kv, tx, SyncCopyEngine(), p_stats, LOG)
    pusher.start()
    try:
        assert push(pusher, rx.endpoint) == {"r"}
        assert d_store.pinned_chunks() == 2
        assert load(loader, spec()) == ({"r"}, set())
        assert token_values(d_kv, D_BLOCKS, 0, 69).equal(token_values(p_kv, P_BLOCKS, 0, 69))
        per_token = fp.page_bytes // chunk
        assert received_bytes(rx) == (69 - 2 * chunk) * per_token
        assert p_stats.snapshot()["c:bytes_sent"] == (69 - 2 * chunk) * per_token
        assert d_store.pinned_chunks() == 0 and d_store.leases() == 0
        assert rx.occupancy() == 0 and tx.pages_in_use() == 0
    finally:
        pusher.shutdown()
        tx.shutdown()
        loader.shutdown()
        rx.shutdown()
        d_store.close(timeout=5.0)
