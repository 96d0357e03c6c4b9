"""L2 (local disk): write-through, persistence across stores, faults, the directory limit."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lmcache_disagg.transfer.protocol import LayoutFingerprint
from lmcache_disagg.transfer.store import CacheMiss, ChunkStore, MemoryStoreMetrics, Tier

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
    directory: Path, fp: LayoutFingerprint = FP, **fields: object
) -> tuple[ChunkStore, MemoryStoreMetrics]:
    metrics = MemoryStoreMetrics()
    fields.setdefault("max_local_disk_size", 64 << 20)
    store = ChunkStore(settings(local_disk=directory, **fields), fp, metrics)
    store.start()
    return store, metrics


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file())


def _lookup(store: ChunkStore, prompt: list[int], lease: str, max_tokens: int | None = None):
    keys = chain(root_of(), prompt)
    limit = len(prompt) if max_tokens is None else max_tokens
    return store.lookup(root_of(), keys, prompt, limit, BLOCK, lease)


def _check(prompt: list[int], pages: list[torch.Tensor], hit) -> None:
    for i, (page, chunk) in enumerate(zip(pages, hit.chunks, strict=True)):
        want = expected_bytes(prompt, i)
        n = min(want.numel(), chunk.num_tokens * (FP.page_bytes // CHUNK))
        assert torch.equal(page[:n], want[:n]), f"chunk {i}"


def _write_prompt(directory: Path, prompt: list[int], fp: LayoutFingerprint = FP) -> None:
    store, metrics = _open(directory, fp)
    store_prompt(store, prompt, root=root_of(fp))
    assert store.flush(10.0)
    store.close()
    assert metrics.total("written_bytes", Tier.L2) > 0


def test_a_new_store_on_the_same_directory_serves_earlier_chunks(tmp_path: Path) -> None:
    prompt = tokens(3 * CHUNK + 40)
    _write_prompt(tmp_path, prompt)
    assert len(_files(tmp_path)) == 4
    store, metrics = _open(tmp_path)
    assert store.chunks(Tier.L2) == 4 and store.chunks(Tier.L1) == 0
    hit = _lookup(store, prompt, "restart")
    assert hit.num_tokens == len(prompt)
    assert {c.tier for c in hit.chunks} == {Tier.L2}
    pages = store.fetch("restart", 5.0)
    _check(prompt, pages, hit)
    store.release("restart")
    assert metrics.total("promotions", Tier.L2) == 4
    assert store.contains(hit.chunks[0].key) is Tier.L1
    assert drained(store)
    store.close()


def test_l2_alone_serves_a_shared_prefix_finer_than_a_chunk(tmp_path: Path) -> None:
    prefix = tokens(1000)
    _write_prompt(tmp_path, prefix)
    store, _ = _open(tmp_path, local_cpu=False)
    second = prefix + tokens(300, start=60_000)
    hit = _lookup(store, second, "l2", len(second) - 1)
    assert hit.num_tokens >= 1000 - BLOCK
    pages = store.fetch("l2", 5.0)
    _check(prefix, pages, hit)
    store.release("l2")
    assert store.leases() == 0
    store.close()


def test_close_flushes_pending_writes_within_its_timeout(tmp_path: Path) -> None:
    store, _ = _open(tmp_path)
    prompts = [tokens(CHUNK, start=1000 * i) for i in range(20)]
    for prompt in prompts:
        store_prompt(store, prompt)
    store.close(timeout=10.0)
    assert len(_files(tmp_path)) == 20
    again, _ = _open(tmp_path)
    assert again.chunks(Tier.L2) == 20
    again.close()


def test_truncated_file_is_deleted_counted_and_never_loaded(tmp_path: Path) -> None:
    prompt = tokens(2 * CHUNK)
    _write_prompt(tmp_path, prompt)
    keys = chain(root_of(), prompt)
    victim = next(p for p in _files(tmp_path) if keys[1].hex() in p.name)
    with open(victim, "r+b") as handle:
        handle.truncate(victim.stat().st_size // 2)
    store, metrics = _open(tmp_path)
    assert metrics.total("faults", Tier.L2, reason="truncated") == 1
    assert not victim.exists()
    hit = _lookup(store, prompt, "t")
    assert hit.num_tokens == CHUNK  # served up to the bad chunk, the rest is recomputed
    store.release("t")
    store.close()


def test_bit_flipped_file_is_a_miss_deleted_and_counted(tmp_path: Path) -> None:
    prompt = tokens(2 * CHUNK)
    _write_prompt(tmp_path, prompt)
    keys = chain(root_of(), prompt)
    victim = next(p for p in _files(tmp_path) if keys[1].hex() in p.name)
    data = bytearray(victim.read_bytes())
    data[-100] ^= 0x01
    victim.write_bytes(bytes(data))
    store, metrics = _open(tmp_path, local_cpu=True)
    hit = _lookup(store, prompt, "f")
    assert hit.num_tokens == 2 * CHUNK  # the header is fine: found by the index
    with pytest.raises(CacheMiss) as info:
        store.fetch("f", 5.0)
    assert info.value.index == 1 and info.value.reason == "checksum"
    store.release("f")
    assert metrics.total("faults", Tier.L2, reason="checksum") == 1
    assert not victim.exists()
    assert _lookup(store, prompt, "f2").num_tokens == CHUNK
    store.release("f2")
    assert drained(store)
    store.close()


def test_files_of_another_fingerprint_are_not_loaded_and_a_forged_one_is_deleted(
    tmp_path: Path,
) -> None:
    prompt = tokens(CHUNK)
    _write_prompt(tmp_path, prompt, fp=FP_OTHER)
    (other,) = _files(tmp_path)
    store, metrics = _open(tmp_path)
    assert store.chunks(Tier.L2) == 0 and other.exists()  # another rank's/model's: left alone
    assert store.usage()[Tier.L2][0] == other.stat().st_size  # but counted against the limit
    store.close()
    # the same record under our name (e.g. a directory reused by another model): foreign
    key = chain(root_of(), prompt)[0]
    ours = store_path = tmp_path / f"{_digest_hex(FP)}-{key.hex()}.kv"
    os.link(other, store_path)
    store, metrics = _open(tmp_path)
    assert metrics.total("faults", Tier.L2, reason="foreign") == 1
    assert not ours.exists() and store.chunks(Tier.L2) == 0
    assert _lookup(store, prompt, "x").num_tokens == 0
    store.close()


def _digest_hex(fp: LayoutFingerprint) -> str:
    from lmcache_disagg.transfer.store.format import fingerprint_digest

    return fingerprint_digest(fp).hex()


def test_a_file_deleted_by_another_process_is_just_a_miss(tmp_path: Path) -> None:
    prompt = tokens(CHUNK)
    _write_prompt(tmp_path, prompt)
    store, _ = _open(tmp_path)
    hit = _lookup(store, prompt, "gone")
    assert hit.chunks[0].tier is Tier.L2
    for path in _files(tmp_path):
        path.unlink()
    with pytest.raises(CacheMiss) as info:
        store.fetch("gone", 5.0)
    assert info.value.reason == "missing"
    store.release("gone")
    assert _lookup(store, prompt, "gone2").num_tokens == 0
    store.close()


def test_stale_files_count_against_the_limit_and_the_disk_stays_under_it(tmp_path: Path) -> None:
    limit = 40 * FP.page_bytes
    old = time.time() - 3600
    for i in range(30):  # an earlier run's / another rank's files
        stale = tmp_path / f"stale-{i}.kv"
        stale.write_bytes(b"\0" * FP.page_bytes)
        os.utime(stale, (old + i, old + i))
    store, metrics = _open(tmp_path, max_local_disk_size=limit, disk_scan_interval=0.0)
    for i in range(60):
        store_prompt(store, tokens(CHUNK, start=100_000 + 1000 * i))
        assert store.flush(10.0)
        total = sum(p.stat().st_size for p in _files(tmp_path))
        assert total <= limit, f"directory holds {total} > {limit} bytes after chunk {i}"
    assert not any(p.name.startswith("stale-") for p in _files(tmp_path))
    assert metrics.total("evictions", Tier.L2) >= 30
    used, capacity = store.usage()[Tier.L2]
    assert used <= capacity == limit
    store.close()


def test_a_directory_over_its_limit_at_start_is_trimmed(tmp_path: Path) -> None:
    for i in range(10):
        (tmp_path / f"left-{i}.bin").write_bytes(b"\0" * 100_000)
    store, _ = _open(tmp_path, max_local_disk_size=350_000)
    assert sum(p.stat().st_size for p in _files(tmp_path)) <= 350_000
    store.close()


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real 256 KiB tmpfs: writes past it fail with ENOSPC."""
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount_point)], check=True
    )
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_disk_full_is_a_counted_fault_and_l1_keeps_serving(tiny_tmpfs: Path) -> None:
    # the limit is far above the filesystem: the kernel says ENOSPC first
    store, metrics = _open(tiny_tmpfs, max_local_disk_size=1 << 30)
    prompts = [tokens(CHUNK, start=10_000 * i) for i in range(16)]  # 16 x 32 KiB > 256 KiB
    for prompt in prompts:
        store_prompt(store, prompt)
    assert store.flush(10.0)
    assert metrics.total("faults", Tier.L2, reason="disk_full") >= 1
    assert not any(p.name.endswith(".tmp") for p in _files(tiny_tmpfs))  # no temp files left
    for n, prompt in enumerate(prompts):
        hit = _lookup(store, prompt, f"full{n}")
        assert hit.num_tokens == CHUNK and hit.chunks[0].tier is Tier.L1
        _check(prompt, store.fetch(f"full{n}", 5.0), hit)
        store.release(f"full{n}")
    assert drained(store)
    store.close()


def test_two_tp_ranks_share_one_directory_limit(tmp_path: Path) -> None:
    limit = 24 * FP.page_bytes
    rank1 = LayoutFingerprint(
        **{**{f: getattr(FP, f) for f in FP.__struct_fields__}, "tp_rank": 1, "tp_size": 2}
    )
    rank0 = LayoutFingerprint(**{**{f: getattr(FP, f) for f in FP.__struct_fields__}, "tp_size": 2})
    stores = [
        _open(
            tmp_path,
            fp,
            max_local_disk_size=limit,
            disk_scan_interval=0.0,
            local_disk_fsync="always",
        )
        for fp in (rank0, rank1)
    ]
    for i in range(20):
        for n, (store, _) in enumerate(stores):
            fp = (rank0, rank1)[n]
            store_prompt(store, tokens(CHUNK, start=1000 * i), root=root_of(fp))
            assert store.flush(10.0)
            total = sum(p.stat().st_size for p in _files(tmp_path))
            assert total <= limit, f"{total} > {limit}"
    indexed = 0
    for store, _ in stores:
        store.flush(10.0)
        indexed += store.chunks(Tier.L2)
        store.close()
    assert 0 < indexed < 40  # each rank forgot the files the other one evicted


def test_with_l1_off_chunks_go_through_staging_pages_to_disk(tmp_path: Path) -> None:
    store, metrics = _open(tmp_path, local_cpu=False)
    assert store.enabled and Tier.L1 not in store.usage()
    prompts = [tokens(CHUNK + 17, start=3000 * i) for i in range(12)]  # more than staging pages
    for prompt in prompts:
        root, parent = root_of(), root_of()
        for i, key in enumerate(chain(root, prompt)):
            ids = prompt[i * CHUNK : i * CHUNK + CHUNK]
            deadline = time.monotonic() + 10.0
            page = store.reserve_page()
            while page is None and time.monotonic() < deadline:  # all staging pages in flight
                time.sleep(0.01)
                page = store.reserve_page()
            assert page is not None
            data = expected_bytes(prompt, i)
            page[: data.numel()].copy_(data)
            store.commit(page, key, parent, ids, data.numel())
            parent = key
    assert drained(store)
    assert store.chunks(Tier.L2) == 24 and metrics.total("hits", Tier.L1) == 0
    for n, prompt in enumerate(prompts):
        hit = _lookup(store, prompt, f"s{n}")
        assert hit.num_tokens == len(prompt) and {c.tier for c in hit.chunks} == {Tier.L2}
        _check(prompt, store.fetch(f"s{n}", 5.0), hit)
        store.release(f"s{n}")
    assert drained(store) and store.leases() == 0
    store.close()


def test_each_fault_reason_is_logged_once_and_counted_every_time(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    prompts = [tokens(CHUNK, start=5000 * i) for i in range(3)]
    for prompt in prompts:
        _write_prompt(tmp_path, prompt)
    for path in _files(tmp_path):
        data = bytearray(path.read_bytes())
        data[-1] ^= 0x80
        path.write_bytes(bytes(data))
    store, metrics = _open(tmp_path)
    with caplog.at_level("WARNING", logger="lmcache_disagg.transfer.store.disk"):
        for n, prompt in enumerate(prompts):
            _lookup(store, prompt, f"c{n}")
            with pytest.raises(CacheMiss):
                store.fetch(f"c{n}", 5.0)
            store.release(f"c{n}")
    assert metrics.total("faults", Tier.L2, reason="checksum") == 3
    assert sum("checksum" in r.getMessage() for r in caplog.records) == 1
    store.close()
