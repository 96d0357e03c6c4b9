"""Triton gather/scatter for GPU caches; runs on CPU tensors under ``TRITON_INTERPRET=1``.

One program moves one token of one layer's K (or V, or MLA latent) view: all heads and the whole
head dim as a ``[BLOCK_H, BLOCK_D]`` tile. The view's four strides are kernel arguments, so one
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
def _gather_token_kernel(  # type: ignore[no-untyped-def]
    src_ptr,
    dst_ptr,
    block_ids_ptr,
    token_start,
    block_size,
    num_heads,
    head_dim,
    s_blk,
    s_slot,
    s_head,
    s_dim,
    d_tok,
    d_head,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    i = tl.program_id(0)
    pos = token_start + i
    blk = tl.load(block_ids_ptr + pos // block_size).to(tl.int64)
    slot = pos % block_size
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < num_heads) & (d < head_dim)
    src = src_ptr + blk * s_blk + slot * s_slot + h * s_head + d * s_dim
    x = tl.load(src, mask=mask)
    tl.store(dst_ptr + i.to(tl.int64) * d_tok + h * d_head + d, x, mask=mask)


@triton.jit
def _scatter_token_kernel(  # type: ignore[no-untyped-def]
    src_ptr,
    dst_ptr,
    block_ids_ptr,
    token_start,
    block_size,
    num_heads,
    head_dim,
    s_blk,
    s_slot,
    s_head,
    s_dim,
    d_tok,
    d_head,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Same index math as the gather; here src is the chunk and dst the cache view.
    i = tl.program_id(0)
    pos = token_start + i
    blk = tl.load(block_ids_ptr + pos // block_size).to(tl.int64)
    slot = pos % block_size
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < num_heads) & (d < head_dim)
    x = tl.load(src_ptr + i.to(tl.int64) * d_tok + h * d_head + d, mask=mask)
    dst = dst_ptr + blk * s_blk + slot * s_slot + h * s_head + d * s_dim
    tl.store(dst, x, mask=mask)


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
    gather: bool,
) -> None:
    s_blk, s_slot, s_head, s_dim = view.stride()
    d_tok, d_head, d_dim = chunk_slice.stride()
    if d_dim != 1:
        raise KernelError("the chunk's head_dim axis must be contiguous")
    src, dst = (view, chunk_slice) if gather else (chunk_slice, view)
    kernel[(num_tokens,)](
        src,
        dst,
        block_ids,
        token_start,
        layout.block_size,
        layout.num_kv_heads,
        layout.head_dim,
        s_blk,
        s_slot,
        s_head,
        s_dim,
        d_tok,
        d_head,
        BLOCK_H=triton.next_power_of_2(layout.num_kv_heads),
        BLOCK_D=triton.next_power_of_2(layout.head_dim),
    )


def _run(
    kernel: Any,
    chunk: torch.Tensor,
    kv_caches: Sequence[torch.Tensor],
    layout: KVLayout,
    block_ids: torch.Tensor,
    token_start: int,
    token_end: int,
    gather: bool,
) -> None:
    _require_triton()
    n = token_end - token_start
    for layer, cache in enumerate(kv_caches):
        k, v = layout.token_views(cache)
        for kv, view in enumerate((k,) if v is None else (k, v)):
            _launch(kernel, view, chunk[layer, kv], layout, block_ids, token_start, n, gather)


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
    _run(_gather_token_kernel, out, kv_caches, layout, block_ids, token_start, token_end, True)


def scatter(
    chunk: torch.Tensor,
    kv_caches: Sequence[torch.Tensor],
    layout: KVLayout,
    block_ids: torch.Tensor,
    token_start: int,
    token_end: int,
) -> None:
    """Triton counterpart of :func:`lmcache_disagg.kernels.torch_impl.scatter`."""
    _run(_scatter_token_kernel, chunk, kv_caches, layout, block_ids, token_start, token_end, False)
