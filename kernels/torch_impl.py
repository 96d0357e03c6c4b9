"""Pure-torch gather/scatter: the CPU implementation and the reference for the Triton one.

Per layer and per K/V it is one indexing kernel that reads the cache and writes the chunk (or the
reverse) directly, with no intermediate tensor:

* when a view's blocks are token-major and evenly spaced (``flash_nhd``, dense MLA) the cache is
  seen as one ``[blocks * block_size, heads, dim]`` token table and ``index_select(out=)`` /
  ``index_copy_`` move whole token rows (memcpy speed, parallel over both cores);
* otherwise (``cpu``'s transposed K, ``flash_hnd``) the two-axis ``aten.index.Tensor_out`` /
  ``index_put_`` walk ``[block, slot]`` pairs.

Callers go through :mod:`lmcache_disagg.kernels.ops`, which validates arguments first.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from lmcache_disagg.kernels.layouts import KVLayout

__all__ = ["gather", "scatter", "token_indices"]


def token_indices(
    layout: KVLayout, block_ids: torch.Tensor, token_start: int, token_end: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(block, slot)`` int64 tensors for the absolute token positions ``[start, end)``."""
    pos = torch.arange(token_start, token_end, dtype=torch.int64, device=block_ids.device)
    blk = block_ids.index_select(0, pos // layout.block_size).to(torch.int64)
    return blk, pos % layout.block_size


def _token_table(view: torch.Tensor) -> torch.Tensor | None:
    """``view`` ``[B, N, H, D]`` as ``[B*N, H, D]`` if that is a pure view, else None."""
    b, n, h, d = view.shape
    s_b, s_n, s_h, s_d = view.stride()
    if b > 1 and s_b != n * s_n:
        return None
    return view.as_strided((b * n, h, d), (s_n, s_h, s_d), view.storage_offset())


def _views(layout: KVLayout, cache: torch.Tensor) -> list[torch.Tensor]:
    k, v = layout.token_views(cache)
    return [k] if v is None else [k, v]


def gather(
    kv_caches: Sequence[torch.Tensor],
    layout: KVLayout,
    block_ids: torch.Tensor,
    token_start: int,
    token_end: int,
    out: torch.Tensor,
) -> None:
    """Copy tokens ``[token_start, token_end)`` of every layer into the contiguous chunk ``out``."""
    blk, slot = token_indices(layout, block_ids, token_start, token_end)
    flat_idx = blk * layout.block_size + slot
    for layer, cache in enumerate(kv_caches):
        for kv, view in enumerate(_views(layout, cache)):
            dst = out[layer, kv]
            table = _token_table(view)
            if table is not None:
                torch.index_select(table, 0, flat_idx, out=dst)
            else:
                torch.ops.aten.index.Tensor_out(view, [blk, slot], out=dst)


def scatter(
    chunk: torch.Tensor,
    kv_caches: Sequence[torch.Tensor],
    layout: KVLayout,
    block_ids: torch.Tensor,
    token_start: int,
    token_end: int,
) -> None:
    """Write the chunk's tokens into tokens ``[token_start, token_end)`` of every layer's cache."""
    blk, slot = token_indices(layout, block_ids, token_start, token_end)
    flat_idx = blk * layout.block_size + slot
    for layer, cache in enumerate(kv_caches):
        for kv, view in enumerate(_views(layout, cache)):
            src = chunk[layer, kv]
            table = _token_table(view)
            if table is not None:
                table.index_copy_(0, flat_idx, src)
            else:
                view.index_put_((blk, slot), src)
