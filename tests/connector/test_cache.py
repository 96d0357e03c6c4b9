"""The connector's cache paths on the real chunk store and CPU caches: store, look up, load.

A :class:`WorkerCache` gathers a prompt's chunks out of one set of blocks, the lookup (over the
real ZMQ ``ipc://`` pair the scheduler uses) finds and pins them, and the load scatters them into
other blocks: the KV that arrives is bitwise what was gathered, partial chunks and sub-chunk
reuse included, and every pin and lease is released afterwards, on failures too.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator

import pytest
import torch

from lmcache_disagg.config import load_config
from lmcache_disagg.connector.cache import WorkerCache
from lmcache_disagg.connector.device import SyncCopyEngine
from lmcache_disagg.connector.logonce import LogOnce
from lmcache_disagg.connector.lookup import LookupClient, LookupServer, lookup_address
from lmcache_disagg.connector.metadata import CacheLoad, LMCacheDisaggMetadata, StoreProgress
from lmcache_disagg.connector.protocol import PROTOCOL_VERSION, LookupRequest
from lmcache_disagg.connector.stats import StatsRecorder
from tests.connector.utils import BLOCK, CHUNK, make_kv, token_values

LOG = LogOnce(logging.getLogger("test"))
SRC_BLOCKS = [3, 7, 1, 9, 4, 12, 13]
DST_BLOCKS = [20, 21, 30, 31, 40, 41]


@pytest.fixture
def cache() -> Iterator[tuple[WorkerCache, LookupClient, StatsRecorder]]:
    config = load_config(overrides={"chunk_size": CHUNK, "max_local_cpu_size": "1MiB"}, environ={})
    stats = StatsRecorder()
    worker_cache = WorkerCache(config, make_kv(num_blocks=64), SyncCopyEngine(), stats, LOG)
    worker_cache.start()
    address = lookup_address(f"test-{uuid.uuid4()}", 0)
    server = LookupServer(address, worker_cache.answer)
    server.start()
    client = LookupClient([address], timeout=5.0)
    try:
        yield worker_cache, client, stats
    finally:
        client.close()
        server.shutdown()
        worker_cache.shutdown()


def store(cache: WorkerCache, req_id: str, tokens: list[int], blocks: list[int]) -> None:
    meta = LMCacheDisaggMetadata(
        store_progress=[StoreProgress(req_id, tokens, blocks, len(tokens), len(tokens), True)]
    )
    cache.on_metadata(meta)
    cache.after_forward()


def lookup(client: LookupClient, lease: str, tokens: list[int], block: int = BLOCK) -> int:
    result = client.lookup(LookupRequest(PROTOCOL_VERSION, lease, tokens, len(tokens) - 1, block))
    assert result.error == ""
    return result.num_tokens


def load(cache: WorkerCache, req_id: str, lease: str, end: int, start: int = 0) -> set[str]:
    cache.on_metadata(
        LMCacheDisaggMetadata(cache_loads=[CacheLoad(req_id, lease, DST_BLOCKS, start, end)])
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        done, failed = cache.poll(set())
        if done:
            assert done == {req_id}
            return failed
        cache.wait_a_little(0.01)
    raise AssertionError("load did not finish")


def assert_drained(cache: WorkerCache) -> None:
    assert cache.store.flush(5.0)
    assert cache.drained() == {
        "pinned_chunks": 0, "leases": 0, "reserved_pages": 0, "pending_loads": 0,
    }  # fmt: skip


def test_a_stored_prompt_loads_back_bitwise_all_but_its_last_token(
    cache: tuple[WorkerCache, LookupClient, StatsRecorder],
) -> None:
    worker_cache, client, stats = cache
    kv = worker_cache.kv
    tokens = list(range(100, 140))  # 16 + 16 + a partial chunk of 8
    store(worker_cache, "r1", tokens, SRC_BLOCKS)
    result = client.lookup(LookupRequest(PROTOCOL_VERSION, "r2#1", tokens, 39, BLOCK))
    assert (result.num_tokens, result.error) == (39, "")
    # Where each chunk of the hit is (vLLM's per-source metric); the hit offers all 40 stored.
    assert result.spans == (("l1", 16), ("l1", 16), ("l1", 8))
    assert load(worker_cache, "r2", "r2#1", 39) == set()
    torch.testing.assert_close(
        token_values(kv, DST_BLOCKS, 0, 39), token_values(kv, SRC_BLOCKS, 0, 39), rtol=0, atol=0
    )
    assert_drained(worker_cache)
    data = stats.snapshot()
    assert data["c:cache_tokens_stored"] == 40
    assert data["c:cache_tokens_loaded"] == 39
    assert data["tc:hits:l1:"] == 3
    assert data["tg:pinned_chunks:l1"] == 0


def test_a_chunk_whose_first_tokens_match_serves_them_at_block_granularity(
    cache: tuple[WorkerCache, LookupClient, StatsRecorder],
) -> None:
    worker_cache, client, _ = cache
    kv = worker_cache.kv
    tokens = list(range(100, 140))
    store(worker_cache, "r1", tokens, SRC_BLOCKS)
    # Same first 16 + 4 tokens, then different: chunk 1 serves its first 4 tokens (block 4).
    other = [*tokens[:20], *range(900, 920)]
    assert lookup(client, "r3#1", other, block=4) == 20
    assert lookup(client, "r4#1", other, block=BLOCK) == 16
    worker_cache.on_metadata(LMCacheDisaggMetadata(cache_releases=["r4#1"]))
    # vLLM already holds the first 8 tokens: only [8, 20) is loaded.
    assert load(worker_cache, "r3", "r3#1", 20, start=8) == set()
    torch.testing.assert_close(
        token_values(kv, DST_BLOCKS, 8, 20), token_values(kv, SRC_BLOCKS, 8, 20), rtol=0, atol=0
    )
    assert_drained(worker_cache)


def test_a_prefix_already_stored_is_not_gathered_again(
    cache: tuple[WorkerCache, LookupClient, StatsRecorder],
) -> None:
    worker_cache, _, stats = cache
    tokens = list(range(100, 140))
    store(worker_cache, "r1", tokens, SRC_BLOCKS)
    store(worker_cache, "r2", [*tokens[:32], *range(500, 520)], SRC_BLOCKS)
    # r2 shares two whole chunks: only its own 20 tokens are new.
    assert stats.snapshot()["c:cache_tokens_stored"] == 40 + 20


def test_failures_release_the_lease_and_recompute(
    cache: tuple[WorkerCache, LookupClient, StatsRecorder],
) -> None:
    worker_cache, client, stats = cache
    tokens = list(range(100, 140))
    store(worker_cache, "r1", tokens, SRC_BLOCKS)
    # A lease the lookup never granted.
    assert load(worker_cache, "r5", "nope#1", 16) == {"r5"}
    # A miss: nothing stored for these tokens.
    assert lookup(client, "r6#1", list(range(7000, 7040))) == 0
    # Aborted while its fetch ran: reported failed, pins released.
    assert lookup(client, "r7#1", tokens) == 39
    worker_cache.on_metadata(
        LMCacheDisaggMetadata(cache_loads=[CacheLoad("r7", "r7#1", DST_BLOCKS, 0, 39)])
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        done, failed = worker_cache.poll({"r7"})
        if done:
            break
    assert failed == {"r7"}
    reasons = {k for k in stats.snapshot() if k.startswith("c:cache_load_failures:")}
    assert reasons == {"c:cache_load_failures:lease_unknown", "c:cache_load_failures:aborted"}
    assert_drained(worker_cache)


def test_a_lookup_without_a_worker_times_out_to_zero() -> None:
    client = LookupClient([lookup_address(f"absent-{uuid.uuid4()}", 0)], timeout=0.2)
    try:
        result = client.lookup(LookupRequest(PROTOCOL_VERSION, "x#1", [1, 2, 3], 2, 16))
        assert (result.num_tokens, result.error) == (0, "timeout")
    finally:
        client.close()


def test_decode_chunks_are_stored_with_save_decode_cache(
    cache: tuple[WorkerCache, LookupClient, StatsRecorder],
) -> None:
    worker_cache, client, stats = cache
    prompt = list(range(100, 120))  # 16 + a partial prompt chunk of 4
    answer = list(range(600, 612))  # decode completes chunk 1 at 32 tokens
    meta = LMCacheDisaggMetadata(store_progress=[StoreProgress("d1", prompt, SRC_BLOCKS, 20, 20)])
    worker_cache.on_metadata(meta)
    worker_cache.after_forward()
    meta = LMCacheDisaggMetadata(store_progress=[StoreProgress("d1", answer, SRC_BLOCKS, 32, 20)])
    worker_cache.on_metadata(meta)
    worker_cache.after_forward()
    # 16 + the partial prompt chunk of 4 + the full chunk decode completed.
    assert stats.snapshot()["c:cache_tokens_stored"] == 16 + 4 + 16
    # The next turn (prompt + answer + a new question) finds all 32 tokens.
    assert lookup(client, "t2#1", [*prompt, *answer, 7, 8, 9]) == 32
    worker_cache.on_metadata(LMCacheDisaggMetadata(cache_releases=["t2#1"]))
    assert_drained(worker_cache)
