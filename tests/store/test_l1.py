"""L1 (CPU RAM): commit visibility, LRU, pins, leases, sub-chunk reuse, bounds, concurrency."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from lmcache_disagg.transfer.store import CacheMiss, ChunkStore, MemoryStoreMetrics, Tier

from .utils import (
    BLOCK,
    CHUNK,
    FP,
    chain,
    chunk_bytes,
    drained,
    expected_bytes,
    root_of,
    settings,
    store_prompt,
    tokens,
)


def _store(pages: int = 64, **fields: object) -> tuple[ChunkStore, MemoryStoreMetrics]:
    metrics = MemoryStoreMetrics()
    store = ChunkStore(settings(max_local_cpu_size=pages * FP.page_bytes, **fields), FP, metrics)
    store.start()
    return store, metrics


def _lookup(store: ChunkStore, prompt: list[int], lease: str, max_tokens: int | None = None):
    keys = chain(root_of(), prompt)
    limit = len(prompt) - 1 if max_tokens is None else max_tokens
    return store.lookup(root_of(), keys, prompt, limit, BLOCK, lease)


def _check_pages(prompt: list[int], pages: list[torch.Tensor], hit) -> None:
    for i, (page, chunk) in enumerate(zip(pages, hit.chunks, strict=True)):
        want = expected_bytes(prompt, i)
        n = min(want.numel(), chunk.num_tokens * (FP.page_bytes // CHUNK))
        assert torch.equal(page[:n], want[:n]), f"chunk {i} bytes differ"


def test_store_lookup_fetch_release_drains_to_zero() -> None:
    store, metrics = _store()
    prompt = tokens(3 * CHUNK)
    assert store.enabled
    store_prompt(store, prompt)
    assert store.contains(chain(root_of(), prompt)[0]) is Tier.L1
    hit = _lookup(store, prompt, "a", max_tokens=len(prompt))
    assert hit.num_tokens == 3 * CHUNK
    assert [c.tier for c in hit.chunks] == [Tier.L1] * 3
    assert store.pinned_chunks() == 3 and store.leases() == 1
    pages = store.fetch("a", timeout=5.0)
    _check_pages(prompt, pages, hit)
    store.release("a")
    store.release("a")  # idempotent
    assert drained(store) and store.leases() == 0
    assert metrics.total("hits", Tier.L1) == 3
    assert metrics.total("hit_tokens", Tier.L1) == 3 * CHUNK
    store.close()
    store.close()


def test_uncommitted_page_is_invisible_and_abandon_returns_it() -> None:
    store, _ = _store(pages=2)
    prompt = tokens(CHUNK)
    key = chain(root_of(), prompt)[0]
    page = store.reserve_page()
    assert page is not None
    page.fill_(7)
    assert store.contains(key) is None
    assert _lookup(store, prompt, "x", len(prompt)).num_tokens == 0
    assert store.reserved_pages() == 1
    store.abandon(page)
    assert store.reserved_pages() == 0
    # bad arguments free the page too
    page = store.reserve_page()
    assert page is not None
    with pytest.raises(ValueError):
        store.commit(page, key, root_of(), prompt, 3)
    assert drained(store)
    store.close()


def test_duplicate_commit_keeps_the_first_copy_and_frees_the_page() -> None:
    store, _ = _store(pages=4)
    prompt = tokens(CHUNK)
    store_prompt(store, prompt)
    page = store.reserve_page()
    assert page is not None
    page.fill_(0)
    assert not store.commit(page, chain(root_of(), prompt)[0], root_of(), prompt, FP.page_bytes)
    assert store.usage()[Tier.L1][0] == FP.page_bytes
    hit = _lookup(store, prompt, "d", len(prompt))
    _check_pages(prompt, store.fetch("d", 5.0), hit)
    store.release("d")
    assert drained(store)
    store.close()


def test_lru_evicts_the_least_recently_used_unpinned_chunk() -> None:
    store, metrics = _store(pages=4)
    prompts = [tokens(CHUNK, start=10_000 * i) for i in range(4)]
    for prompt in prompts:
        store_prompt(store, prompt)
    # touch prompt 0 so prompt 1 is the oldest
    assert _lookup(store, prompts[0], "t", CHUNK).num_tokens == CHUNK
    store.release("t")
    store_prompt(store, tokens(CHUNK, start=99_000))
    assert metrics.total("evictions", Tier.L1) == 1
    assert store.contains(chain(root_of(), prompts[1])[0]) is None
    assert store.contains(chain(root_of(), prompts[0])[0]) is Tier.L1
    assert store.usage()[Tier.L1] == (4 * FP.page_bytes, 4 * FP.page_bytes)
    store.close()


def test_pinned_chunks_are_never_evicted_and_a_full_pool_says_none() -> None:
    store, _ = _store(pages=3)
    prompt = tokens(3 * CHUNK)
    store_prompt(store, prompt)
    hit = _lookup(store, prompt, "p", len(prompt))
    assert hit.num_tokens == 3 * CHUNK
    assert store.reserve_page() is None  # everything pinned
    store.release("p")
    page = store.reserve_page()
    assert page is not None
    store.abandon(page)
    assert drained(store)
    store.close()


def test_an_unreleased_lease_expires_and_unpins() -> None:
    store, metrics = _store(pages=4)
    prompt = tokens(2 * CHUNK)
    store_prompt(store, prompt)
    keys = chain(root_of(), prompt)
    hit = store.lookup(root_of(), keys, prompt, len(prompt), BLOCK, "late", ttl=0.05)
    assert hit.num_tokens == 2 * CHUNK and store.pinned_chunks() == 2
    deadline = time.monotonic() + 10.0
    while store.leases() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert store.leases() == 0 and store.pinned_chunks() == 0
    assert metrics.total("faults", Tier.L1, reason="lease_expired") == 1
    with pytest.raises(CacheMiss) as info:
        store.fetch("late", 1.0)
    assert info.value.index == 0
    store.release("late")  # safe after expiry
    store.close()


def test_a_second_lookup_under_the_same_lease_replaces_it() -> None:
    store, _ = _store(pages=4)
    prompt = tokens(2 * CHUNK)
    store_prompt(store, prompt)
    _lookup(store, prompt, "same", len(prompt))
    _lookup(store, prompt, "same", len(prompt))
    assert store.pinned_chunks() == 2 and store.leases() == 1
    store.release("same")
    assert drained(store)
    store.close()


def test_shared_1000_token_prefix_reuses_all_but_one_block() -> None:
    """Whole-chunk matching would give 768; the partial last chunk of the first prompt is
    matched on its stored token ids at block granularity."""
    store, _ = _store()
    prefix = tokens(1000)
    store_prompt(store, prefix)  # chunks of 256, 256, 256 and 232 tokens
    second = prefix + tokens(500, start=50_000)
    hit = _lookup(store, second, "s")
    assert hit.num_tokens >= 1000 - BLOCK
    assert hit.num_tokens % BLOCK == 0 and hit.num_tokens <= 1000
    assert [c.num_tokens for c in hit.chunks][:3] == [CHUNK] * 3
    assert [c.stored_tokens for c in hit.chunks] == [CHUNK, CHUNK, CHUNK, 232]
    pages = store.fetch("s", 5.0)
    _check_pages(prefix, pages, hit)
    store.release("s")
    assert drained(store)
    store.close()


def test_sub_chunk_match_of_a_longer_stored_chunk_at_block_granularity() -> None:
    store, _ = _store()
    first = tokens(CHUNK + 100) + tokens(CHUNK, start=70_000)
    store_prompt(store, first)
    second = tokens(CHUNK + 100) + tokens(CHUNK, start=80_000)  # chunk 1 shares 100 tokens
    hit = _lookup(store, second, "b")
    assert hit.num_tokens == CHUNK + 100 - 100 % BLOCK
    assert hit.chunks[1].num_tokens == 96 and hit.chunks[1].stored_tokens == CHUNK
    store.release("b")
    store.close()


def test_same_prompt_twice_and_the_max_tokens_rule() -> None:
    store, _ = _store()
    prompt = tokens(1000)
    store_prompt(store, prompt)
    exact = _lookup(store, prompt, "e", max_tokens=1000)
    assert exact.num_tokens == 1000  # ends at a chunk end == max_tokens
    store.release("e")
    minus_one = _lookup(store, prompt, "m")  # max_tokens = 999
    assert minus_one.num_tokens == 999 - 999 % BLOCK
    assert minus_one.num_tokens <= 999
    store.release("m")
    assert _lookup(store, tokens(1000, start=5), "n").num_tokens == 0
    assert drained(store)
    store.close()


def test_l1_off_means_no_pages_and_no_hits() -> None:
    store = ChunkStore(settings(local_cpu=False), FP)
    store.start()
    assert not store.enabled
    assert store.reserve_page() is None
    prompt = tokens(CHUNK)
    assert _lookup(store, prompt, "z").num_tokens == 0
    assert store.usage() == {}
    store.close()


def _rss_bytes() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_overfill_of_ten_times_l1_stays_within_capacity_and_rss() -> None:
    pages = 512  # 16 MiB of L1
    store, metrics = _store(pages=pages)
    capacity = store.usage()[Tier.L1][1]
    rss_before = _rss_bytes()
    root = root_of()
    for i in range(10 * pages):
        ids = [i % 50_000 + 1] * CHUNK
        key = chain(root, [i, *ids])[0]
        page = store.reserve_page()
        assert page is not None
        page.fill_(i % 251)
        store.commit(page, key, root, ids, FP.page_bytes)
        assert store.usage()[Tier.L1][0] <= capacity
    growth = _rss_bytes() - rss_before
    margin = 64 << 20  # interpreter, index and allocator slack, not pages
    assert growth <= margin, f"RSS grew by {growth} bytes"
    assert metrics.total("evictions", Tier.L1) == 9 * pages
    assert store.chunks(Tier.L1) == pages
    assert drained(store)
    store.close()


def test_concurrent_storers_and_readers_never_see_a_partial_chunk() -> None:
    store, _ = _store(pages=32)
    prompt = tokens(4 * CHUNK + 40)
    keys = chain(root_of(), prompt)
    errors: list[str] = []
    stop = threading.Event()
    reads = [0]

    def storer() -> None:
        parent = root_of()
        for i, key in enumerate(keys):
            ids = prompt[i * CHUNK : i * CHUNK + CHUNK]
            page = store.reserve_page()
            if page is None:
                parent = key
                continue
            data = chunk_bytes(ids)
            half = data.numel() // 2
            page[:half].copy_(data[:half])
            time.sleep(0.001)  # a reader must not see the half-written page
            page[half : data.numel()].copy_(data[half:])
            store.commit(page, key, parent, ids, data.numel())
            parent = key

    def reader(n: int) -> None:
        count = 0
        while not stop.is_set():
            count += 1
            lease = f"r{n}-{count}"
            hit = store.lookup(root_of(), keys, prompt, len(prompt), BLOCK, lease)
            if not hit.chunks:
                continue
            try:
                pages = store.fetch(lease, 5.0)
                for i, (page, chunk) in enumerate(zip(pages, hit.chunks, strict=True)):
                    want = expected_bytes(prompt, i)
                    n_bytes = min(want.numel(), chunk.num_tokens * (FP.page_bytes // CHUNK))
                    if not torch.equal(page[:n_bytes], want[:n_bytes]):
                        errors.append(f"partial/wrong chunk {i} seen by {lease}")
                reads[0] += 1
            except CacheMiss as exc:
                errors.append(f"unexpected miss {exc}")
            finally:
                store.release(lease)

    readers = [threading.Thread(target=reader, args=(n,)) for n in range(4)]
    storers = [threading.Thread(target=storer) for _ in range(4)]
    for thread in readers + storers:
        thread.start()
    for thread in storers:
        thread.join(30)
    stop.set()
    for thread in readers:
        thread.join(30)
    assert not errors, errors[:5]
    assert reads[0] > 0
    final = store.lookup(root_of(), keys, prompt, len(prompt), BLOCK, "final")
    assert final.num_tokens == len(prompt)
    store.release("final")
    assert drained(store)
    store.close()
