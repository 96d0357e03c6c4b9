"""Shared helpers for chunk-store tests: a small layout, a key chain, chunk bytes, storing."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
import xxhash

from lmcache_disagg.transfer.protocol import LayoutFingerprint
from lmcache_disagg.transfer.store import ChunkStore, StoreSettings

CHUNK = 256
BLOCK = 16
# 2 layers x 2 x 256 tokens x 1 head x 8 dims x 4 bytes = 32 KiB per full chunk page
FP = LayoutFingerprint(
    model="tiny", dtype="float32", num_layers=2, num_kv_heads=1, head_dim=8,
    chunk_size=CHUNK, tp_rank=0, tp_size=1,
)  # fmt: skip
BPT = FP.page_bytes // CHUNK


def root_of(fp: LayoutFingerprint = FP) -> bytes:
    return xxhash.xxh3_128_digest(b"test-root" + fp.model.encode() + bytes([fp.tp_rank]))


def chain(root: bytes, token_ids: Sequence[int], chunk: int = CHUNK) -> list[bytes]:
    """The hash chain over ``token_ids`` (the last key may cover a partial chunk)."""
    keys, prev = [], root
    for start in range(0, len(token_ids), chunk):
        part = token_ids[start : start + chunk]
        prev = xxhash.xxh3_128_digest(
            prev + struct.pack("<I", len(part)) + struct.pack(f"<{len(part)}q", *part)
        )
        keys.append(prev)
    return keys


def chunk_bytes(token_ids: Sequence[int]) -> torch.Tensor:
    """Deterministic uint8 'KV' for a chunk: a function of its tokens."""
    seed = xxhash.xxh64_intdigest(struct.pack(f"<{len(token_ids)}q", *token_ids))
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (len(token_ids) * BPT,), dtype=torch.uint8, generator=gen)


def expected_bytes(prompt: Sequence[int], index: int, chunk: int = CHUNK) -> torch.Tensor:
    return chunk_bytes(prompt[: index * chunk + chunk][index * chunk :])


def settings(**fields: object) -> StoreSettings:
    base = StoreSettings(max_local_cpu_size=64 * FP.page_bytes, lease_ttl=30.0)
    return replace(base, **fields)  # type: ignore[arg-type]


def store_prompt(
    store: ChunkStore, prompt: Sequence[int], root: bytes | None = None, chunk: int = CHUNK
) -> list[bytes]:
    """Store every chunk of ``prompt`` (the partial last one too); return its keys."""
    root = root_of() if root is None else root
    keys = chain(root, prompt, chunk)
    parent = root
    for i, key in enumerate(keys):
        ids = list(prompt[i * chunk : i * chunk + chunk])
        page = store.reserve_page()
        assert page is not None
        data = chunk_bytes(ids)
        page[: data.numel()].copy_(data)
        store.commit(page, key, parent, ids, data.numel())
        parent = key
    return keys


def drained(store: ChunkStore) -> bool:
    return store.flush(10.0) and store.pinned_chunks() == 0 and store.reserved_pages() == 0


def tokens(n: int, start: int = 1000) -> list[int]:
    return list(range(start, start + n))


__all__ = [
    "BLOCK", "BPT", "CHUNK", "FP", "Path", "chain", "chunk_bytes", "drained",
    "expected_bytes", "root_of", "settings", "store_prompt", "tokens",
]  # fmt: skip
