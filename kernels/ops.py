"""``gather`` / ``scatter``: the public entry points, argument checks and device dispatch.

Token positions are absolute within the request: token ``t`` lives in block
``block_ids[t // block_size]`` at slot ``t % block_size``, where ``block_ids`` is the request's
whole block table. ``[token_start, token_end)`` may start and end mid-block.

Dispatch (``impl="auto"``): CUDA (and other accelerator) tensors use the Triton kernels when
Triton imports, CPU tensors the torch implementation. ``impl="torch"`` / ``"triton"`` force one (tests run the Triton
kernels on CPU tensors under ``TRITON_INTERPRET=1``).

Both calls are synchronous with respect to the host on CPU; on GPU they are enqueued on the
current stream. They may be called from any thread, but not concurrently on overlapping tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from lmcache_disagg.kernels import torch_impl
from lmcache_disagg.kernels.errors import ChunkError
from lmcache_disagg.kernels.layouts import KVLayout

__all__ = ["Impl", "gather", "scatter"]

Impl = Literal["auto", "torch", "triton"]

_INT_DTYPES = (torch.int32, torch.int64)


def _check(
    chunk: torch.Tensor,
    kv_caches: Sequence[torch.Tensor],
    layout: KVLayout,
    block_ids: torch.Tensor,
    token_start: int,
    token_end: int,
) -> torch.Tensor:
    """Validate everything and return ``block_ids`` on the caches' device."""
    if len(kv_caches) == 0:
        raise ChunkError("kv_caches is empty")
    if not 0 <= token_start <= token_end:
        raise ChunkError(f"bad token range [{token_start}, {token_end})")
    expect = layout.chunk_shape(len(kv_caches), token_end - token_start)
    if tuple(chunk.shape) != expect:
        raise ChunkError(f"chunk shape {list(chunk.shape)} != expected {list(expect)}")
    if chunk.dtype != layout.dtype:
        raise ChunkError(f"chunk dtype {chunk.dtype} != layout dtype {layout.dtype}")
    if not chunk.is_contiguous():
        raise ChunkError("the chunk tensor must be contiguous (a view over a pool page)")
    first = kv_caches[0]
    for layer, cache in enumerate(kv_caches):
        layout.check_cache(cache)
        if cache.shape != first.shape or cache.device != first.device:
            raise ChunkError(
                f"layer {layer} cache is {list(cache.shape)} on {cache.device}, layer 0 is "
                f"{list(first.shape)} on {first.device}"
            )
    if chunk.device != first.device:
        raise ChunkError(f"chunk is on {chunk.device}, the caches on {first.device}")
    if block_ids.dim() != 1 or block_ids.dtype not in _INT_DTYPES:
        raise ChunkError(
            f"block_ids must be a 1-D int32/int64 tensor, got {block_ids.dtype} "
            f"of shape {list(block_ids.shape)}"
        )
    needed = -(-token_end // layout.block_size)
    if block_ids.numel() < needed:
        raise ChunkError(
            f"tokens up to {token_end} need {needed} blocks of {layout.block_size}, the block "
            f"table has {block_ids.numel()}"
        )
    if block_ids.device != first.device:
        block_ids = block_ids.to(first.device, non_blocking=True)
    if token_end > token_start and first.device.type == "cpu":
        # Range-check only on CPU: on a GPU it would force a device sync per chunk.
        used = block_ids[token_start // layout.block_size : needed]
        lo, hi = int(used.min()), int(used.max())
        num_blocks = first.shape[0]
        if lo < 0 or hi >= num_blocks:
            raise ChunkError(
                f"block ids {lo}..{hi} out of range for a cache of {num_blocks} blocks"
            )
    return block_ids


def _use_triton(impl: Impl, device: torch.device) -> bool:
    if impl == "auto":
        if device.type == "cpu":
            return False
        from lmcache_disagg.kernels import triton_impl

        # Without Triton the torch implementation still works on any device, only slower.
        return triton_impl.HAS_TRITON
    return impl == "triton"


def gather(
    kv_caches: Sequence[torch.Tensor],
    layout: KVLayout,
    block_ids: torch.Tensor,
    token_start: int,
    token_end: int,
    out: torch.Tensor,
    *,
    impl: Impl = "auto",
) -> None:
    """Copy tokens ``[token_start, token_end)`` of all layers into ``out``, in place.

    ``out`` is a contiguous canonical chunk ``layout.chunk_shape(len(kv_caches), n)`` in the
    cache dtype, typically :func:`chunk_view` of a pool page. Raises :class:`ChunkError` /
    :class:`LayoutError` on inconsistent arguments, before anything is written.
    """
    block_ids = _check(out, kv_caches, layout, block_ids, token_start, token_end)
    if token_end == token_start:
        return
    if _use_triton(impl, out.device):
        from lmcache_disagg.kernels import triton_impl

        triton_impl.gather(kv_caches, layout, block_ids, token_start, token_end, out)
    else:
        torch_impl.gather(kv_caches, layout, block_ids, token_start, token_end, out)


def scatter(
    chunk: torch.Tensor,
    kv_caches: Sequence[torch.Tensor],
    layout: KVLayout,
    block_ids: torch.Tensor,
    token_start: int,
    token_end: int,
    *,
    impl: Impl = "auto",
) -> None:
    """Write ``chunk`` into tokens ``[token_start, token_end)`` of all layers' caches.

    Only those token slots change. Same argument contract as :func:`gather`.
    """
    block_ids = _check(chunk, kv_caches, layout, block_ids, token_start, token_end)
    if token_end == token_start:
        return
    if _use_triton(impl, chunk.device):
        from lmcache_disagg.kernels import triton_impl

        triton_impl.scatter(chunk, kv_caches, layout, block_ids, token_start, token_end)
    else:
        torch_impl.scatter(chunk, kv_caches, layout, block_ids, token_start, token_end)
