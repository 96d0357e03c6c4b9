"""Pure-torch gather/scatter: the CPU implementation and the reference for the Triton one.

Two strategies, chosen per call:

* **Block runs** (the fast path). A chunk touches few blocks (16 for 256 tokens of 16), and inside
  a block its tokens are consecutive slots. When the per-layer caches are equally spaced windows
  of one allocation (how vLLM 0.32 allocates a KV cache group) they are one strided tensor
  ``[L, B, H, N, C]``, and each block run is a single ``copy_`` between strided views for all
  layers, K and V together where they share a cell, parallel over the intra-op threads. Whole
  blocks with consecutive ids (what vLLM's free-block queue hands a new request on a fresh or
  lightly used server) merge into one span and one ``copy_``. For the token-major ``flash_nhd``
  cells that is close to ``copy_`` speed; layouts that store K transposed (``cpu``) or in tiles
  (``cpu_amx``) pay for element-wise shuffles. Caches that are not equally spaced get one
  ``copy_`` per layer and run.
* **Index kernels**, when there would be too many runs (tiny blocks): one ``aten.index`` /
  ``index_put_`` per layer and K/V over ``[block, slot]`` pairs.

Neither allocates a temporary the size of the chunk. Callers go through
:mod:`lmcache_disagg.kernels.ops`, which validates the arguments first.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lmcache_disagg.kernels.layouts import KVLayout, layer_groups

__all__ = ["block_runs", "block_spans", "gather", "scatter", "token_indices"]

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


# (chunk token offset, block id, first tile, first slot in the tile, tokens, whole tiles or 0)
TileRun = tuple[int, int, int, int, int, int]

# (chunk token offset, first block id, number of whole blocks with consecutive ids)
Span = tuple[int, int, int]


def block_spans(runs: list[Run], block_size: int) -> tuple[list[Span], list[Run]]:
    """Merge whole-block runs whose block ids are consecutive into spans; the other runs (partial
    first or last blocks) are returned as they are."""
    spans: list[Span] = []
    rest: list[Run] = []
    for offset, block, slot, length in runs:
        if slot or length != block_size:
            rest.append((offset, block, slot, length))
            continue
        if spans:
            first_offset, first_block, count = spans[-1]
            if first_block + count == block and first_offset + count * block_size == offset:
                spans[-1] = (first_offset, first_block, count + 1)
                continue
        spans.append((offset, block, 1))
    return spans, rest


def _tile_runs(runs: list[Run], tile: int) -> list[TileRun]:
    """Split block runs at token-tile boundaries (only ``cpu_amx`` has tiles smaller than a
    block): a partial head tile, the whole tiles in between as one entry, a partial tail."""
    out: list[TileRun] = []
    for i, block, slot, length in runs:
        end = slot + length
        while slot < end:
            if slot % tile == 0 and end - slot >= 2 * tile:
                whole = (end - slot) // tile
                out.append((i, block, slot // tile, 0, whole * tile, whole))
                step = whole * tile
            else:
                step = min(tile - slot % tile, end - slot)
                out.append((i, block, slot // tile, slot % tile, step, 0))
            i, slot = i + step, slot + step
    return out


def _runs_copy(
    layout: KVLayout,
    chunk: torch.Tensor,
    kv_caches: Sequence[torch.Tensor],
    runs: list[Run],
    to_chunk: bool,
    max_copies: int,
) -> bool:
    """Move the runs with ``copy_``; False (nothing done) if that would take too many calls."""
    spans, rest = block_spans(runs, layout.block_size)
    plan = []
    for layers, cells in layer_groups(layout, kv_caches):
        for kv0, view in cells:
            plan.append((layers, kv0, view, _tile_runs(rest, view.shape[-5])))
    if sum(len(spans) + len(tiled) for *_, tiled in plan) > max_copies:
        return False
    for layers, kv0, view, tiled in plan:
        _, _, tiles, tile, _, kv, d1, d0 = view.shape
        # chunk [L', kv, tokens, H, D] -> [L', tokens, H, kv, D1, D0] to match the cells
        part = chunk[layers, kv0 : kv0 + kv].unflatten(-1, (d1, d0)).movedim(1, 3)
        for i, block, count in spans:
            whole_blocks = part[:, i : i + count * tiles * tile].unflatten(1, (count, tiles, tile))
            cells = view[:, block : block + count]
            if to_chunk:
                whole_blocks.copy_(cells)
            else:
                cells.copy_(whole_blocks)
        for i, block, t1, t0, length, whole in tiled:
            if whole:
                dst = part[:, i : i + length].unflatten(1, (whole, tile))
                src = view[:, block, t1 : t1 + whole]
            else:
                dst = part[:, i : i + length]
                src = view[:, block, t1, t0 : t0 + length]
            if to_chunk:
                dst.copy_(src)
            else:
                src.copy_(dst)
    return True


def _index_views(
    layout: KVLayout, kv_caches: Sequence[torch.Tensor]
) -> list[tuple[int, int, torch.Tensor]]:
    """``(layer, kv, [B, T1, T0, H, D1, D0] view)`` for every layer and K/V."""
    views = []
    for layers, cells in layer_groups(layout, kv_caches):
        for kv0, view in cells:
            for j in range(view.shape[-3]):
                per_kv = view.select(-3, j)
                for offset in range(per_kv.shape[0]):
                    views.append((layers.start + offset, kv0 + j, per_kv[offset]))
    return views


def _tile_index(blk: torch.Tensor, slot: torch.Tensor, view: torch.Tensor) -> list[torch.Tensor]:
    """Index tensors for ``view`` ``[B, T1, T0, ...]``: block, token tile, slot in the tile."""
    tile = view.shape[2]
    return [blk, slot // tile, slot % tile]


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
    for layer, kv, view in _index_views(layout, kv_caches):
        dst = out[layer, kv].unflatten(-1, view.shape[-2:])
        torch.ops.aten.index.Tensor_out(view, _tile_index(blk, slot, view), out=dst)


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
    for layer, kv, view in _index_views(layout, kv_caches):
        src = chunk[layer, kv].unflatten(-1, view.shape[-2:])
        view.index_put_(tuple(_tile_index(blk, slot, view)), src)
