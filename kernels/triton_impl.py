"""Triton gather/scatter for GPU caches; runs on CPU tensors under ``TRITON_INTERPRET=1``.

One program moves ``BLOCK_T`` tokens of one layer's K (or V, or MLA latent) view, all heads and
the whole head dim, as a ``[BLOCK_T, heads*head_dim]`` tile. The view's four strides are kernel arguments, so one
kernel serves every layout (:meth:`KVLayout.token_views` builds the views), and the block table
is read inside the kernel, so no index tensors are built on the host.

Import guard: like ``vllm/triton_utils``, this module imports without Triton; ``HAS_TRITON``
says whether the launchers can run. ``TRITON_INTERPRET`` is read by Triton when it is first
imported, so set it before anything imports ``triton``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from lmcache_disagg.kernels.errors import KernelError
from lmcache_disagg.kernels.layouts import KVLayout

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
def _token_offsets(  # type: ignore[no-untyped-def]
    block_ids_ptr,
    token_start,
    num_tokens,
    block_size,
    num_heads,
    head_dim,
    s_blk,
    s_slot,
    s_head,
    s_dim,
    d_tok,
    d_head,
    BLOCK_T: tl.constexpr,
    BLOCK_HD: tl.constexpr,
):
    """Cache and chunk offsets plus mask of this program's ``[BLOCK_T, BLOCK_HD]`` tile."""
    i = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = i < num_tokens
    pos = token_start + i
    blk = tl.load(block_ids_ptr + pos // block_size, mask=t_mask, other=0).to(tl.int64)
    slot = pos % block_size
    # heads x head_dim flattened into one axis so a small head_dim still fills the tile.
    hd = tl.arange(0, BLOCK_HD)
    h = hd // head_dim
    d = hd % head_dim
    mask = t_mask[:, None] & (hd < num_heads * head_dim)[None, :]
    cache_off = (blk * s_blk + slot * s_slot)[:, None] + (h * s_head + d * s_dim)[None, :]
    chunk_off = i.to(tl.int64)[:, None] * d_tok + (h * d_head + d)[None, :]
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
    s_blk,
    s_slot,
    s_head,
    s_dim,
    d_tok,
    d_head,
    BLOCK_T: tl.constexpr,
    BLOCK_HD: tl.constexpr,
):
    cache_off, chunk_off, mask = _token_offsets(
        block_ids_ptr, token_start, num_tokens, block_size, num_heads, head_dim,
        s_blk, s_slot, s_head, s_dim, d_tok, d_head, BLOCK_T, BLOCK_HD,
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
    s_blk,
    s_slot,
    s_head,
    s_dim,
    d_tok,
    d_head,
    BLOCK_T: tl.constexpr,
    BLOCK_HD: tl.constexpr,
):
    cache_off, chunk_off, mask = _token_offsets(
        block_ids_ptr, token_start, num_tokens, block_size, num_heads, head_dim,
        s_blk, s_slot, s_head, s_dim, d_tok, d_head, BLOCK_T, BLOCK_HD,
    )  # fmt: skip
    x = tl.load(chunk_ptr + chunk_off, mask=mask)
    tl.store(cache_ptr + cache_off, x, mask=mask)


# Elements per program tile: one or a few tokens' worth of all heads (GPU register budget).
_TILE_ELEMS = 4096
_MAX_TILE_TOKENS = 64


def _require_triton() -> None:
    if not HAS_TRITON:
        raise KernelError("Triton is not installed; the Triton KV kernels cannot run")


def _launch(
    kernel: Any,
    view: torch.Tensor,
    chunk_slice: torch.Tensor,
    layout: KVLayout,
    block_ids: torch.Tensor,
    token_start: int,
    num_tokens: int,
) -> None:
    s_blk, s_slot, s_head, s_dim = view.stride()
    d_tok, d_head, d_dim = chunk_slice.stride()
    if d_dim != 1:
        raise KernelError("the chunk's head_dim axis must be contiguous")
    block_hd = triton.next_power_of_2(layout.num_kv_heads * layout.head_dim)
    block_t = max(1, min(_TILE_ELEMS // block_hd, _MAX_TILE_TOKENS))
    block_t = min(block_t, triton.next_power_of_2(num_tokens))
    grid = (-(-num_tokens // block_t),)
    kernel[grid](
        view,
        chunk_slice,
        block_ids,
        token_start,
        num_tokens,
        layout.block_size,
        layout.num_kv_heads,
        layout.head_dim,
        s_blk,
        s_slot,
        s_head,
        s_dim,
        d_tok,
        d_head,
        BLOCK_T=block_t,
        BLOCK_HD=block_hd,
    )


def _run(
    kernel: Any,
    chunk: torch.Tensor,
    kv_caches: Sequence[torch.Tensor],
    layout: KVLayout,
    block_ids: torch.Tensor,
    token_start: int,
    token_end: int,
) -> None:
    _require_triton()
    n = token_end - token_start
    for layer, cache in enumerate(kv_caches):
        k, v = layout.token_views(cache)
        for kv, view in enumerate((k,) if v is None else (k, v)):
            _launch(kernel, view, chunk[layer, kv], layout, block_ids, token_start, n)


def gather(
    kv_caches: Sequence[torch.Tensor],
    layout: KVLayout,
    block_ids: torch.Tensor,
    token_start: int,
    token_end: int,
    out: torch.Tensor,
) -> None:
    """Triton counterpart of :func:`lmcache_disagg.kernels.torch_impl.gather` (one launch per
    layer and K/V, on the caches' stream). Arguments are validated by ``ops``."""
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
