"""L3 (Redis / Valkey / Redis Cluster) against real redis-server processes."""

from __future__ import annotations

import time

import pytest
import torch

from lmcache_disagg.transfer.protocol import LayoutFingerprint
from lmcache_disagg.transfer.store import CacheMiss, ChunkStore, MemoryStoreMetrics, Tier
from lmcache_disagg.transfer.store.format import fingerprint_digest

from .redis_servers import RedisCluster, RedisServer
from .utils import (
    BLOCK,
    CHUNK,
    FP,
    chain,
    drained,
    expected_bytes,
    root_of,
    settings,
    store_prompt,
    tokens,
)

FP_OTHER = LayoutFingerprint(
    model="other-model", dtype="float32", num_layers=2, num_kv_heads=1, head_dim=8,
    chunk_size=CHUNK, tp_rank=0, tp_size=1,
)  # fmt: skip


def _open(
    url: str, fp: LayoutFingerprint = FP, **fields: object
) -> tuple[ChunkStore, MemoryStoreMetrics]:
    metrics = MemoryStoreMetrics()
    # The deadline is not what these tests measure (the timeout test sets its own), and a busy CI
    # host can take longer than a production deadline to answer a first connect.
    fields.setdefault("remote_timeout", 5.0)
    store = ChunkStore(settings(remote_url=url, **fields), fp, metrics)
    store.start()
    return store, metrics


def _lookup(store: ChunkStore, prompt: list[int], lease: str, max_tokens: int | None = None):
    keys = chain(root_of(), prompt)
    limit = len(prompt) if max_tokens is None else max_tokens
    return store.lookup(root_of(), keys, prompt, limit, BLOCK, lease)


def _check(prompt: list[int], pages: list[torch.Tensor], hit) -> None:
    for i, (page, chunk) in enumerate(zip(pages, hit.chunks, strict=True)):
        want = expected_bytes(prompt, i)
        n = min(want.numel(), chunk.num_tokens * (FP.page_bytes // CHUNK))
        assert torch.equal(page[:n], want[:n]), f"chunk {i}"


def _write(url: str, prompt: list[int], **fields: object) -> MemoryStoreMetrics:
    store, metrics = _open(url, **fields)
    store_prompt(store, prompt)
    assert store.flush(10.0)
    store.close()
    return metrics


def _name(key: bytes, fp: LayoutFingerprint = FP) -> str:
    return f"lmcd:{fingerprint_digest(fp).hex()}:{key.hex()}"


def test_a_second_fresh_store_sharing_the_redis_finds_the_chunks(redis_server: RedisServer) -> None:
    prompt = tokens(3 * CHUNK + 10)
    written = _write(redis_server.url, prompt)
    assert written.total("written_bytes", Tier.L3) > 0
    # valkey:// speaks the same protocol
    url = redis_server.url.replace("redis://", "valkey://")
    store, metrics = _open(url)
    hit = _lookup(store, prompt, "l3")
    assert hit.num_tokens == len(prompt)
    assert {c.tier for c in hit.chunks} == {Tier.L3}
    _check(prompt, store.fetch("l3", 5.0), hit)
    store.release("l3")
    assert metrics.total("promotions", Tier.L3) == 4
    assert metrics.total("read_bytes", Tier.L3) == len(prompt) * (FP.page_bytes // CHUNK)
    assert store.contains(hit.chunks[0].key) is Tier.L1
    assert drained(store)
    store.close()


def test_l3_alone_serves_a_shared_prefix_finer_than_a_chunk(redis_server: RedisServer) -> None:
    prefix = tokens(1000)
    _write(redis_server.url, prefix)
    store, _ = _open(redis_server.url)
    second = prefix + tokens(400, start=70_000)
    hit = _lookup(store, second, "sub", len(second) - 1)
    assert hit.num_tokens >= 1000 - BLOCK
    assert hit.chunks[-1].tier is Tier.L3 and hit.chunks[-1].stored_tokens == 1000 - 3 * CHUNK
    _check(prefix, store.fetch("sub", 5.0), hit)
    store.release("sub")
    store.close()


def test_keys_are_namespaced_by_fingerprint_and_carry_the_ttl(redis_server: RedisServer) -> None:
    prompt = tokens(CHUNK)
    _write(redis_server.url, prompt, remote_ttl=100.0)
    key = chain(root_of(), prompt)[0]
    ttl_ms = int(redis_server.cli("PTTL", _name(key)))
    assert 0 < ttl_ms <= 100_000
    children = f"lmcd:{fingerprint_digest(FP).hex()}:c:{root_of().hex()}"
    assert 0 < int(redis_server.cli("PTTL", children)) <= 100_000
    other, _ = _open(redis_server.url, fp=FP_OTHER)
    assert _lookup(other, prompt, "o").num_tokens == 0
    other.close()
    no_ttl = tokens(CHUNK, start=5000)
    _write(redis_server.url, no_ttl)
    assert int(redis_server.cli("PTTL", _name(chain(root_of(), no_ttl)[0]))) == -1


def _set_raw(server: RedisServer, name: str, value: bytes) -> None:
    assert server.cli_bytes("-x", "SET", name, stdin=value).strip() == b"OK"


def test_a_value_of_the_wrong_size_or_a_bad_checksum_is_a_counted_miss(
    redis_server: RedisServer,
) -> None:
    prompt = tokens(2 * CHUNK)
    _write(redis_server.url, prompt)
    keys = chain(root_of(), prompt)
    good = redis_server.cli_bytes("--no-raw", "STRLEN", _name(keys[1]))
    assert int(good.strip().split()[-1]) > 0
    _set_raw(redis_server, _name(keys[1]), b"too short")
    store, metrics = _open(redis_server.url)
    hit = _lookup(store, prompt, "w")
    assert hit.num_tokens == 2 * CHUNK
    try:
        store.fetch("w", 5.0)
        raise AssertionError("a wrong-size value was served")
    except CacheMiss as miss:
        assert miss.index == 1 and miss.reason == "bad_size"
    store.release("w")
    assert metrics.total("faults", Tier.L3, reason="bad_size") == 1
    # a value of the right size with one flipped payload byte
    again = tokens(CHUNK, start=9000)
    _write(redis_server.url, again)
    name = _name(chain(root_of(), again)[0])
    raw = bytearray(redis_server.cli_bytes("--raw", "GET", name)[:-1])  # --raw appends \n
    raw[-5] ^= 0xFF
    _set_raw(redis_server, name, bytes(raw))
    hit = _lookup(store, again, "c")
    assert hit.num_tokens == CHUNK
    try:
        store.fetch("c", 5.0)
        raise AssertionError("a corrupt value was served")
    except CacheMiss as miss:
        assert miss.reason == "checksum"
    store.release("c")
    assert metrics.total("faults", Tier.L3, reason="checksum") == 1
    assert drained(store)
    store.close()


def test_redis_stopped_mid_run_is_a_miss_and_the_store_keeps_serving(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("WARNING", logger="lmcache_disagg.transfer.store.remote")
    store, metrics = _open(redis_server.url)
    first = tokens(CHUNK)
    store_prompt(store, first)
    assert store.flush(10.0)
    redis_server.stop()
    later = tokens(CHUNK, start=40_000)
    store_prompt(store, later)  # write-through fails: counted, never raised
    store.flush(10.0)
    assert metrics.total("faults", Tier.L3, reason="unavailable") >= 1
    for extra in range(5):  # more failed writes: counted, not logged again
        store_prompt(store, tokens(CHUNK, start=200_000 + 1000 * extra))
    store.flush(10.0)
    assert metrics.total("faults", Tier.L3, reason="unavailable") >= 6
    assert sum("unavailable" in r.getMessage() for r in caplog.records) == 1
    for n, prompt in enumerate((first, later)):  # L1 still serves both
        hit = _lookup(store, prompt, f"k{n}")
        assert hit.num_tokens == CHUNK
        _check(prompt, store.fetch(f"k{n}", 5.0), hit)
        store.release(f"k{n}")
    fresh, fresh_metrics = _open(redis_server.url)
    assert _lookup(fresh, first, "down").num_tokens == 0
    assert fresh_metrics.total("faults", Tier.L3, reason="unavailable") >= 1
    redis_server.start()  # same port, empty (no persistence)
    third = tokens(CHUNK, start=80_000)
    store_prompt(store, third)
    assert store.flush(10.0)
    # reads pause for a moment after a failure (a hung server costs one deadline), then resume
    deadline = time.monotonic() + 10.0
    hit = _lookup(fresh, third, "back")
    while hit.num_tokens == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
        hit = _lookup(fresh, third, "back")
    assert hit.num_tokens == CHUNK and hit.chunks[0].tier is Tier.L3
    _check(third, fresh.fetch("back", 5.0), hit)
    fresh.release("back")
    fresh.close()
    assert drained(store)
    store.close()


def test_redis_slow_past_its_timeout_is_a_counted_miss(redis_server: RedisServer) -> None:
    prompt = tokens(2 * CHUNK)
    _write(redis_server.url, prompt)
    store, metrics = _open(redis_server.url, remote_timeout=0.3)
    hit = _lookup(store, prompt, "claimed")  # claimed in L3 while the server answers
    assert hit.num_tokens == 2 * CHUNK
    redis_server.pause()
    try:
        try:
            store.fetch("claimed", 5.0)
            raise AssertionError("fetch from a stopped server succeeded")
        except CacheMiss as miss:
            assert miss.index == 0 and miss.reason == "timeout"
        store.release("claimed")
        assert _lookup(store, tokens(CHUNK, start=3), "slow").num_tokens == 0
        store_prompt(store, tokens(CHUNK, start=7))  # its write times out in the background
        store.flush(10.0)
        assert metrics.total("faults", Tier.L3, reason="timeout") >= 2
    finally:
        redis_server.resume()
    assert drained(store)
    store.close()


def test_close_flushes_pending_remote_writes(redis_server: RedisServer) -> None:
    store, _ = _open(redis_server.url)
    prompts = [tokens(CHUNK, start=1000 * i) for i in range(12)]
    for prompt in prompts:
        store_prompt(store, prompt)
    store.close(timeout=10.0)
    for prompt in prompts:
        assert redis_server.cli("EXISTS", _name(chain(root_of(), prompt)[0])).strip() == "1"


def test_a_real_three_node_cluster(redis_cluster: RedisCluster) -> None:
    prompt = tokens(8 * CHUNK + 30)
    written = _write(redis_cluster.url, prompt, remote_cluster=True)
    assert written.total("faults", Tier.L3) == 0
    sizes = [int(node.cli("DBSIZE").strip()) for node in redis_cluster.nodes]
    assert sum(sizes) >= 9 and sum(1 for s in sizes if s) >= 2, sizes
    url = redis_cluster.url.replace("redis://", "redis+cluster://")
    store, _ = _open(url)
    hit = _lookup(store, prompt, "cl")
    assert hit.num_tokens == len(prompt)
    _check(prompt, store.fetch("cl", 5.0), hit)
    store.release("cl")
    shared = prompt[: 2 * CHUNK + 100] + tokens(300, start=90_000)
    sub = _lookup(store, shared, "cl2", len(shared) - 1)
    assert sub.num_tokens == 2 * CHUNK + 96
    store.release("cl2")
    assert drained(store)
    store.close()


def test_long_prompts_need_no_more_connections_than_the_pool(
    redis_server: RedisServer, redis_cluster: RedisCluster
) -> None:
    prompt = tokens(40 * CHUNK)
    # This is about the connection count, not latency: a generous deadline, so a busy CI host's
    # first connect plus 40 pipelined EXISTS never reads as a timeout fault.
    fields: dict[str, object] = {"remote_max_connections": 2, "remote_timeout": 5.0}
    for url, cluster in ((redis_server.url, False), (redis_cluster.url, True)):
        written = _write(url, prompt, remote_cluster=cluster, **fields)
        assert written.total("faults", Tier.L3) == 0
        store, metrics = _open(url, remote_cluster=cluster, **fields)
        hit = _lookup(store, prompt, "long")
        assert hit.num_tokens == len(prompt)
        store.release("long")
        assert metrics.total("faults", Tier.L3) == 0
        store.close()


def test_rediss_with_a_self_signed_certificate(redis_tls_server: RedisServer) -> None:
    assert redis_tls_server.url.startswith("rediss://")
    prompt = tokens(CHUNK + 5)
    written = _write(redis_tls_server.url, prompt)
    assert written.total("faults", Tier.L3) == 0
    store, _ = _open(redis_tls_server.url.replace("rediss://", "valkeys://"))
    hit = _lookup(store, prompt, "tls")
    assert hit.num_tokens == len(prompt)
    _check(prompt, store.fetch("tls", 5.0), hit)
    store.release("tls")
    store.close()
