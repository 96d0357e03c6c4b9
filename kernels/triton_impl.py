"""Triton gather/scatter for GPU caches; runs on CPU tensors under ``TRITON_INTERPRET=1``.

One program moves ``BLOCK_T`` tokens of one layer's K or V (or MLA latent), all heads and the
whole head dim, as a ``[BLOCK_T, heads*head_dim]`` tile; the grid is (token tiles, layers, K/V).
The cell view's strides are kernel arguments, so one kernel serves every layout
(:func:`layer_groups` builds the views), and the block table is read inside the kernel, so no
index tensors are built on the host.

Import guard: like ``vllm/triton_utils``, this module imports without Triton; ``HAS_TRITON``
says whether the launchers can run. ``TRITON_INTERPRET`` is read by Triton when it is first
imported, so set it before anything imports ``triton``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from lmcache_disagg.kernels.errors import KernelError
from lmcache_disagg.kernels.layouts import KVLayout, layer_groups

__all__ = ["HAS_TRITON", "gather", "scatter"]

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is present wherever tests run
    HAS_TRITON = False

    class _TritonPlaceholder:
        """Stands in for ``triton`` so the decorators below still evaluate."""

        @staticmethod
        def jit(fn: Callable[..., Any]) -> Callable[..., Any]:
            return fn

        @staticmethod
        def next_power_of_2(n: int) -> int:
            return 1 << max(n - 1, 0).bit_length()

    class _TritonLanguagePlaceholder:
        constexpr = int

    triton = _TritonPlaceholder()  # type: ignore[assignment]
    tl = _TritonLanguagePlaceholder()  # type: ignore[assignment]


@triton.jit
def _tile_offsets(  # type: ignore[no-untyped-def]
    block_ids_ptr,
    token_start,
    num_tokens,
    block_size,
    num_heads,
    head_dim,
    s_layer,
    s_kv,
    s_blk,
    s_tile,
    s_slot,
    s_head,
    s_dtile,
    s_dim,
    token_tile,
    dim_tile,
    d_layer,
    d_kv,
    d_tok,
    d_head,
    BLOCK_T: tl.constexpr,
    BLOCK_HD: tl.constexpr,
):
    """Cache and chunk offsets plus mask of this program's ``[BLOCK_T, BLOCK_HD]`` tile.

    Grid: (token tiles, layers, kv). Offsets are int64: a cache can exceed 2**31 elements.
    """
    layer = tl.program_id(1).to(tl.int64)
    kv = tl.program_id(2).to(tl.int64)
    i = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = i < num_tokens
    pos = token_start + i
    blk = tl.load(block_ids_ptr + pos // block_size, mask=t_mask, other=0).to(tl.int64)
    slot = pos % block_size
    # vLLM's AMX layout tiles tokens and dims; plain layouts have one tile of each.
    tile = (slot // token_tile).to(tl.int64)
    slot = (slot % token_tile).to(tl.int64)
    # heads x head_dim flattened into one axis so a small head_dim still fills the tile.
    hd = tl.arange(0, BLOCK_HD)
    h = (hd // head_dim).to(tl.int64)
    d = hd % head_dim
    dtile = (d // dim_tile).to(tl.int64)
    d = (d % dim_tile).to(tl.int64)
    mask = t_mask[:, None] & (hd < num_heads * head_dim)[None, :]
    cache_base = layer * s_layer + kv * s_kv
    cell = blk * s_blk + tile * s_tile + slot * s_slot
    cache_off = cache_base + cell[:, None] + (h * s_head + dtile * s_dtile + d * s_dim)[None, :]
    chunk_base = layer * d_layer + kv * d_kv
    chunk_off = chunk_base + i.to(tl.int64)[:, None] * d_tok + (h * d_head + hd % head_dim)[None, :]
    return cache_off, chunk_off, mask


@triton.jit
def _gather_kernel(  # type: ignore[no-untyped-def]
    cache_ptr,
    chunk_ptr,
    block_ids_ptr,
    token_start,
    num_tokens,
    block_size,
    num_heads,
    head_dim,
    s_layer,
    s_kv,
    s_blk,
    s_tile,
    s_slot,
    s_head,
    s_dtile,
    s_dim,
    token_tile,
    dim_tile,
    d_layer,
    d_kv,
    d_tok,
    d_head,
    BLOCK_T: tl.constexpr,
    BLOCK_HD: tl.constexpr,
):
    cache_off, chunk_off, mask = _tile_offsets(
        block_ids_ptr, token_start, num_tokens, block_size, num_heads, head_dim,
        s_layer, s_kv, s_blk, s_tile, s_slot, s_head, s_dtile, s_dim, token_tile, dim_tile,
        d_layer, d_kv, d_tok, d_head,
        BLOCK_T, BLOCK_HD,
    )  # fmt: skip
    x = tl.load(cache_ptr + cache_off, mask=mask)
    tl.store(chunk_ptr + chunk_off, x, mask=mask)


@triton.jit
def _scatter_kernel(  # type: ignore[no-untyped-def]
    cache_ptr,
    chunk_ptr,
    block_ids_ptr,
    token_start,
    num_tokens,
    block_size,
    num_heads,
    head_dim,
    s_layer,
    s_kv,
    s_blk,
    s_tile,
    s_slot,
    s_head,
    s_dtile,
    s_dim,
    token_tile,
    dim_tile,
    d_layer,
    d_kv,
    d_tok,
    d_head,
    BLOCK_T: tl.constexpr,
    BLOCK_HD: tl.constexpr,
):
    cache_off, chunk_off, mask = _tile_offsets(
        block_ids_ptr, token_start, num_tokens, block_size, num_heads, head_dim,
        s_layer, s_kv, s_blk, s_tile, s_slot, s_head, s_dtile, s_dim, token_tile, dim_tile,
        d_layer, d_kv, d_tok, d_head,
        BLOCK_T, BLOCK_HD,
    )  # fmt: skip
    x = tl.load(chunk_ptr + chunk_off, mask=mask)
    tl.store(cache_ptr + cache_off, x, mask=mask)


# Elements per program tile: one or a few tokens' worth of all heads (GPU register budget).
_TILE_ELEMS = 4096
_MAX_TILE_TOKENS = 64


def _require_triton() -> None:
    if not HAS_TRITON:
        raise KernelError("Triton is not installed; the Triton KV kernels cannot run")


def _run(
    kernel: Any,
    chunk: torch.Tensor,
    kv_caches: Sequence[torch.Tensor],
    layout: KVLayout,
    block_ids: torch.Tensor,
    token_start: int,
    token_end: int,
) -> None:
    """One launch per layer group (all layers when they share one allocation) and cell view."""
    _require_triton()
    num_tokens = token_end - token_start
    block_hd = triton.next_power_of_2(layout.num_kv_heads * layout.head_dim)
    block_t = max(1, min(_TILE_ELEMS // block_hd, _MAX_TILE_TOKENS))
    block_t = min(block_t, triton.next_power_of_2(num_tokens))
    tiles = -(-num_tokens // block_t)
    for layers, cells in layer_groups(layout, kv_caches):
        for kv0, view in cells:
            # view [L', B, T1, T0, H, kv, D1, D0]; part [L', kv, n, H, D] (contiguous head_dim)
            kv = view.shape[-3]
            part = chunk[layers, kv0 : kv0 + kv]
            s_layer, s_blk, s_tile, s_slot, s_head, s_kv, s_dtile, s_dim = view.stride()
            d_layer, d_kv, d_tok, d_head, _ = part.stride()
            kernel[(tiles, view.shape[0], kv)](
                view,
                part,
                block_ids,
                token_start,
                num_tokens,
                layout.block_size,
                layout.num_kv_heads,
                layout.head_dim,
                s_layer,
                s_kv,
                s_blk,
                s_tile,
                s_slot,
                s_head,
                s_dtile,
                s_dim,
                view.shape[3],
                view.shape[-1],
                d_layer,
                d_kv,
                d_tok,
                d_head,
                BLOCK_T=block_t,
                BLOCK_HD=block_hd,
            )


def gather(
    kv_caches: Sequence[torch.Tensor],
    layout: KVLayout,
    block_ids: torch.Tensor,
    token_start: int,
    token_end: int,
    out: torch.Tensor,
) -> None:
    """Triton counterpart of :func:`lmcache_disagg.kernels.torch_impl.gather`, enqueued on the
    current stream (one launch for all layers when they share one allocation, else one per
    layer; ``cpu`` caches need separate K and V launches). Arguments are validated by ``ops``."""
    _run(_gather_kernel, out, kv_caches, layout, block_ids, token_start, token_end)


def scatter(
    chunk: torch.Tensor,
    kv_caches: Sequence[torch.Tensor],
    layout: KVLayout,
    block_ids: torch.Tensor,
    token_start: int,
    token_end: int,
) -> None:
    """Triton counterpart of :func:`lmcache_disagg.kernels.torch_impl.scatter`."""
    _run(_scatter_kernel, chunk, kv_caches, layout, block_ids, token_start, token_end)
