"""The gather/scatter property checks, shared by the torch and the Triton test modules."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from lmcache_disagg.kernels import KVLayout, chunk_view, gather, scatter, torch_impl
from tests.kernels.utils import (
    Case,
    bits,
    clone_cache,
    make_caches,
    reference_gather,
    reference_scatter,
    whole_storage,
)

PAGE_POISON = 0xA5

# "torch": the public entry points with impl="torch" (block-run copies where they fit);
# "torch-index": the torch implementation forced onto its index-kernel strategy;
# "triton": the public entry points with impl="triton".
Impl = Literal["torch", "torch-index", "triton"]


def run_gather(
    impl: Impl,
    caches: Sequence[torch.Tensor],
    layout: KVLayout,
    block_ids: torch.Tensor,
    start: int,
    end: int,
    out: torch.Tensor,
) -> None:
    if impl == "torch-index":
        torch_impl.gather(caches, layout, block_ids, start, end, out, max_run_copies=0)
    else:
        gather(caches, layout, block_ids, start, end, out, impl=impl)


def run_scatter(
    impl: Impl,
    chunk: torch.Tensor,
    caches: Sequence[torch.Tensor],
    layout: KVLayout,
    block_ids: torch.Tensor,
    start: int,
    end: int,
) -> None:
    if impl == "torch-index":
        torch_impl.scatter(chunk, caches, layout, block_ids, start, end, max_run_copies=0)
    else:
        scatter(chunk, caches, layout, block_ids, start, end, impl=impl)


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(bits(whole_storage(a)), bits(whole_storage(b)))


def check_case(case: Case, impl: Impl) -> None:
    """Gather matches the reference, scatter writes exactly the target slots, round trip is exact.

    Everything outside the target (other slots, other blocks, block padding, other layers, the
    page tail) is random "poison" that must come out bit-identical.
    """
    layout, caches, table = case.build()
    block_ids = torch.tensor(table, dtype=torch.int64)
    start, end, layers = case.token_start, case.token_end, case.num_layers
    before = [clone_cache(c) for c in caches]

    nbytes = layout.chunk_bytes(layers, case.num_tokens)
    page = torch.full((nbytes + 64,), PAGE_POISON, dtype=torch.uint8)
    out = chunk_view(page, layout, layers, case.num_tokens)
    run_gather(impl, caches, layout, block_ids, start, end, out)

    expect = reference_gather(caches, layout, table, start, end)
    assert torch.equal(bits(out), bits(expect)), f"gather differs from the reference: {case}"
    assert bool((page[nbytes:] == PAGE_POISON).all()), "gather wrote past the chunk"
    for cache, orig in zip(caches, before, strict=True):
        assert _same_storage(cache, orig), "gather wrote the cache"

    # Scatter into fresh caches full of different random poison.
    gen = torch.Generator().manual_seed(case.seed + 1)
    num_blocks = caches[0].shape[0]
    fresh = make_caches(layout, layers, num_blocks, pad=case.pad, shared=case.shared, gen=gen)
    want = [clone_cache(c) for c in fresh]
    if case.shared:  # the clones must share one storage too, like the caches they copy
        want = [
            whole_storage(want[0]).as_strided(c.shape, c.stride(), c.storage_offset())
            for c in fresh
        ]
    reference_scatter(expect, want, layout, table, start, end)
    run_scatter(impl, out, fresh, layout, block_ids, start, end)
    for layer, (got, exp) in enumerate(zip(fresh, want, strict=True)):
        assert _same_storage(got, exp), (
            f"scatter changed the wrong elements in layer {layer}: {case}"
        )

    # Round trip: what was scattered gathers back bit for bit.
    again = torch.empty_like(out)
    run_gather(impl, fresh, layout, block_ids, start, end, again)
    assert torch.equal(bits(again), bits(out)), f"round trip is not exact: {case}"
