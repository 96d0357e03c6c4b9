"""The public surface: exports, layout validation, chunk views, argument checks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import lmcache_disagg.kernels as kernels
from lmcache_disagg.errors import LMCacheDisaggError
from lmcache_disagg.kernels import (
    ChunkError,
    KVLayout,
    LayoutError,
    chunk_view,
    expand_block_ids,
    gather,
    scatter,
)
from tests.kernels.utils import KINDS


def test_exports() -> None:
    assert sorted(kernels.__all__) == [
        "ChunkError",
        "KVLayout",
        "KernelError",
        "LayoutError",
        "LayoutKind",
        "chunk_view",
        "expand_block_ids",
        "gather",
        "scatter",
    ]
    assert issubclass(kernels.KernelError, LMCacheDisaggError)
    assert issubclass(LayoutError, ValueError) and issubclass(ChunkError, ValueError)


def test_import_pulls_in_neither_vllm_nor_triton() -> None:
    code = "import sys, lmcache_disagg.kernels; print(json.dumps(sorted(m for m in ('vllm', 'triton') if m in sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", "import json; " + code],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


@pytest.mark.parametrize("kind", KINDS)
def test_from_cache_round_trips_the_layout(kind: str) -> None:
    heads = 1 if kind == "mla" else 4
    layout = KVLayout(kind, 16, heads, 64, torch.float16)  # type: ignore[arg-type]
    cache = layout.empty_cache(3)
    assert KVLayout.from_cache(kind, cache) == layout  # type: ignore[arg-type]
    assert cache.shape == layout.cache_shape(3)


def test_chunk_geometry() -> None:
    layout = KVLayout("flash_nhd", 16, 8, 128, torch.bfloat16)
    assert layout.chunk_shape(32, 256) == (32, 2, 256, 8, 128)
    assert layout.chunk_bytes(32, 256) == 32 * 2**20
    mla = KVLayout("mla", 64, 1, 576, torch.bfloat16)
    assert mla.chunk_shape(3, 10) == (3, 1, 10, 1, 576)
    assert mla.chunk_bytes(3, 10) == 3 * 10 * 576 * 2


@pytest.mark.parametrize(
    "kind,tensor,match",
    [
        ("flash_nhd", torch.empty(4, 2, 16, 8), "token-major"),  # an HND cache
        ("flash_hnd", torch.empty(4, 16, 2, 8).transpose(1, 2), "head-major"),  # an NHD cache
        ("cpu", torch.empty(4, 2, 16, 7), r"2\*head_size"),  # odd content
        ("cpu", torch.empty(2, 4, 2, 16, 8), r"\[num_blocks, num_kv_heads"),  # rank 5
        ("flash_nhd", torch.empty(2, 4, 16, 8, 8).select(3, 0), "stride"),  # content not dense
        ("mla", torch.empty(4, 2, 16, 8), r"\[num_blocks, 1, block_size, latent_dim\]"),
        ("paged", torch.empty(4, 2, 16, 8), "unknown KV layout kind"),
    ],
)
def test_from_cache_rejects_a_mismatch(kind: str, tensor: torch.Tensor, match: str) -> None:
    with pytest.raises(LayoutError, match=match):
        KVLayout.from_cache(kind, tensor)  # type: ignore[arg-type]


def test_layout_rejects_bad_fields() -> None:
    with pytest.raises(LayoutError, match="block_size"):
        KVLayout("cpu", 0, 2, 8, torch.float32)
    with pytest.raises(LayoutError, match="one head slot"):
        KVLayout("mla", 16, 2, 8, torch.float32)


def test_chunk_view_is_a_view_of_the_page() -> None:
    layout = KVLayout("flash_hnd", 4, 2, 8, torch.float16)
    page = torch.zeros(layout.chunk_bytes(3, 5) + 100, dtype=torch.uint8)
    chunk = chunk_view(page, layout, 3, 5)
    assert chunk.shape == (3, 2, 5, 2, 8) and chunk.dtype == torch.float16
    chunk.fill_(1.0)
    assert page[: layout.chunk_bytes(3, 5)].view(torch.float16).eq(1.0).all()
    assert page[layout.chunk_bytes(3, 5) :].eq(0).all()
    with pytest.raises(ChunkError, match="needs"):
        chunk_view(page[:10], layout, 3, 5)
    with pytest.raises(ChunkError, match="uint8"):
        chunk_view(page.view(torch.float16), layout, 1, 1)
    with pytest.raises(ChunkError, match="aligned"):
        chunk_view(page[1:], layout, 1, 1)


def test_expand_block_ids() -> None:
    assert expand_block_ids(torch.tensor([3, 0]), 4).tolist() == [12, 13, 14, 15, 0, 1, 2, 3]
    assert expand_block_ids([5, 1], 1).tolist() == [5, 1]


def test_kernel_block_split_gathers_the_same_tokens() -> None:
    """A manager block of 32 split into kernel blocks of 16 addresses the same tokens."""
    manager = KVLayout("flash_nhd", 32, 2, 8, torch.float32)
    caches = manager.empty_caches(2, 6)
    for c in caches:
        c.normal_()
    kernel = KVLayout("flash_nhd", 16, 2, 8, torch.float32)
    # vLLM's group_kernel_blocks: [6*2, H, 16, C] kernel blocks over the same bytes.
    split = [c.transpose(1, 2).reshape(12, 16, 2, 16).transpose(1, 2) for c in caches]
    table = torch.tensor([4, 1, 3])
    a = torch.empty(manager.chunk_shape(2, 70))
    b = torch.empty(kernel.chunk_shape(2, 70))
    gather(caches, manager, table, 20, 90, a)
    gather(split, kernel, expand_block_ids(table, 2), 20, 90, b)
    assert torch.equal(a, b)


class TestArgumentChecks:
    layout = KVLayout("flash_nhd", 4, 2, 8, torch.float32)

    def setup_method(self) -> None:
        self.caches = self.layout.empty_caches(2, 5)
        for c in self.caches:
            c.normal_()
        self.table = torch.tensor([2, 0, 4])
        self.out = torch.zeros(self.layout.chunk_shape(2, 6))

    def test_wrong_chunk_shape(self) -> None:
        with pytest.raises(ChunkError, match="chunk shape"):
            gather(self.caches, self.layout, self.table, 0, 5, self.out)

    def test_wrong_chunk_dtype(self) -> None:
        with pytest.raises(ChunkError, match="dtype"):
            scatter(self.out.half(), self.caches, self.layout, self.table, 0, 6)

    def test_non_contiguous_chunk(self) -> None:
        out = torch.zeros(2, 6, 2, 2, 8).transpose(1, 2)
        with pytest.raises(ChunkError, match="contiguous"):
            gather(self.caches, self.layout, self.table, 0, 6, out)

    def test_block_table_too_short(self) -> None:
        with pytest.raises(ChunkError, match="need 4 blocks"):
            gather(self.caches, self.layout, self.table, 7, 13, self.out)

    def test_block_id_out_of_range_writes_nothing(self) -> None:
        before = [c.clone() for c in self.caches]
        with pytest.raises(ChunkError, match="out of range"):
            scatter(self.out, self.caches, self.layout, torch.tensor([2, 9]), 1, 7)
        assert all(torch.equal(a, b) for a, b in zip(self.caches, before, strict=True))

    def test_layers_disagree(self) -> None:
        other = KVLayout("flash_nhd", 4, 2, 8, torch.float32).empty_cache(7)
        with pytest.raises(ChunkError, match="layer 1"):
            gather([self.caches[0], other], self.layout, self.table, 0, 6, self.out)

    def test_wrong_layout_for_the_cache(self) -> None:
        hnd = KVLayout("flash_hnd", 4, 2, 8, torch.float32)
        with pytest.raises(LayoutError, match="stride"):
            gather(self.caches, hnd, self.table, 0, 6, self.out)

    def test_bad_token_range(self) -> None:
        with pytest.raises(ChunkError, match="token range"):
            gather(self.caches, self.layout, self.table, 5, 3, self.out)

    def test_block_ids_must_be_integers(self) -> None:
        with pytest.raises(ChunkError, match="int32/int64"):
            gather(self.caches, self.layout, self.table.float(), 0, 6, self.out)

    def test_empty_range_is_a_no_op(self) -> None:
        empty = torch.zeros(self.layout.chunk_shape(2, 0))
        gather(self.caches, self.layout, self.table, 3, 3, empty)
        scatter(empty, self.caches, self.layout, self.table, 3, 3)

    def test_int32_block_ids(self) -> None:
        gather(self.caches, self.layout, self.table.int(), 1, 7, self.out)
        want = torch.zeros_like(self.out)
        gather(self.caches, self.layout, self.table, 1, 7, want)
        assert torch.equal(self.out, want)
