"""Pure-torch gather/scatter: the CPU implementation and the reference for the Triton one.

Two strategies, chosen per call:

* **Block runs** (the fast path). A chunk touches few blocks (16 for 256 tokens of 16), and inside
  a block its tokens are consecutive slots. When the per-layer caches are equally spaced windows
  of one allocation (how vLLM 0.32 allocates a KV cache group) they are one strided tensor
  ``[L, B, H, N, C]``, and each block run is a single ``copy_`` between strided views for all
  layers, K and V together where they share a cell; that runs at memcpy speed on all intra-op
  threads. Caches that are not equally spaced get one ``copy_`` per layer and run.
* **Index kernels**, when there would be too many runs (tiny blocks): one ``aten.index`` /
  ``index_put_`` per layer and K/V over ``[block, slot]`` pairs.

Neither allocates a temporary the size of the chunk. Callers go through
:mod:`lmcache_disagg.kernels.ops`, which validates the arguments first.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lmcache_disagg.kernels.layouts import KVLayout, layer_groups

__all__ = ["block_runs", "gather", "scatter", "token_indices"]

# Above this many copy_ calls their overhead (a few us each) loses to the index kernels.
MAX_RUN_COPIES = 160

# (chunk token offset, block id, first slot, length)
Run = tuple[int, int, int, int]


def token_indices(
    layout: KVLayout, block_ids: torch.Tensor, token_start: int, token_end: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(block, slot)`` int64 tensors for the absolute token positions ``[start, end)``."""
    pos = torch.arange(token_start, token_end, dtype=torch.int64, device=block_ids.device)
    blk = block_ids.index_select(0, pos // layout.block_size).to(torch.int64)
    return blk, pos % layout.block_size


def block_runs(
    block_size: int, block_ids: torch.Tensor, token_start: int, token_end: int
) -> list[Run]:
    """Split ``[token_start, token_end)`` into per-block runs of consecutive slots."""
    first, last = token_start // block_size, (token_end - 1) // block_size
    runs: list[Run] = []
    pos = token_start
    for block in block_ids[first : last + 1].tolist():
        slot = pos % block_size
        length = min(block_size - slot, token_end - pos)
        runs.append((pos - token_start, int(block), slot, length))
        pos += length
    return runs


def _runs_copy(
    layout: KVLayout,
    chunk: torch.Tensor,
    kv_caches: Sequence[torch.Tensor],
    runs: list[Run],
    to_chunk: bool,
    max_copies: int,
) -> bool:
    """Move the runs with ``copy_``; False (nothing done) if that would take too many calls."""
    groups = layer_groups(layout, kv_caches)
    if len(runs) * sum(len(cells) for _, cells in groups) > max_copies:
        return False
    for layers, cells in groups:
        for kv0, view in cells:
            part = chunk[layers, kv0 : kv0 + view.shape[-2]]
            for i, block, slot, length in runs:
                # chunk [L', kv, tokens, H, D] -> [L', tokens, H, kv, D] to match the cells
                dst = part[:, :, i : i + length].movedim(1, 3)
                src = view[:, block, slot : slot + length]
                if to_chunk:
                    dst.copy_(src)
                else:
                    src.copy_(dst)
    return True


def gather(
    kv_caches: Sequence[torch.Tensor],
    layout: KVLayout,
    block_ids: torch.Tensor,
    token_start: int,
    token_end: int,
    out: torch.Tensor,
    *,
    max_run_copies: int = MAX_RUN_COPIES,
) -> None:
    """Copy tokens ``[token_start, token_end)`` of every layer into the contiguous chunk ``out``."""
    runs = block_runs(layout.block_size, block_ids, token_start, token_end)
    if _runs_copy(layout, out, kv_caches, runs, True, max_run_copies):
        return
    blk, slot = token_indices(layout, block_ids, token_start, token_end)
    for layer, cache in enumerate(kv_caches):
        k, v = layout.token_views(cache)
        for kv, view in enumerate((k,) if v is None else (k, v)):
            torch.ops.aten.index.Tensor_out(view, [blk, slot], out=out[layer, kv])


def scatter(
    chunk: torch.Tensor,
    kv_caches: Sequence[torch.Tensor],
    layout: KVLayout,
    block_ids: torch.Tensor,
    token_start: int,
    token_end: int,
    *,
    max_run_copies: int = MAX_RUN_COPIES,
) -> None:
    """Write the chunk's tokens into tokens ``[token_start, token_end)`` of every layer's cache."""
    runs = block_runs(layout.block_size, block_ids, token_start, token_end)
    if _runs_copy(layout, chunk, kv_caches, runs, False, max_run_copies):
        return
    blk, slot = token_indices(layout, block_ids, token_start, token_end)
    for layer, cache in enumerate(kv_caches):
        k, v = layout.token_views(cache)
        for kv, view in enumerate((k,) if v is None else (k, v)):
            view.index_put_((blk, slot), chunk[layer, kv])
