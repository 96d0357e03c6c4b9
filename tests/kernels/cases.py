"""The gather/scatter property checks, shared by the torch and the Triton test modules."""

from __future__ import annotations

import torch
from lmcache_disagg.kernels import chunk_view, gather, scatter
from lmcache_disagg.kernels.ops import Impl

from tests.kernels.utils import (
    Case,
    bits,
    clone_cache,
    make_cache,
    reference_gather,
    reference_scatter,
    whole_storage,
)

PAGE_POISON = 0xA5


def check_case(case: Case, impl: Impl) -> None:
    """Gather matches the reference, scatter writes exactly the target slots, round trip is exact.

    Everything outside the target (other slots, other blocks, block padding, the page tail) is
    random "poison" that must come out bit-identical.
    """
    layout, caches, table = case.build()
    block_ids = torch.tensor(table, dtype=torch.int64)
    start, end, layers = case.token_start, case.token_end, case.num_layers
    before = [clone_cache(c) for c in caches]

    nbytes = layout.chunk_bytes(layers, case.num_tokens)
    page = torch.full((nbytes + 64,), PAGE_POISON, dtype=torch.uint8)
    out = chunk_view(page, layout, layers, case.num_tokens)
    gather(caches, layout, block_ids, start, end, out, impl=impl)

    expect = reference_gather(caches, layout, table, start, end)
    assert torch.equal(bits(out), bits(expect)), f"gather differs from the reference: {case}"
    assert bool((page[nbytes:] == PAGE_POISON).all()), "gather wrote past the chunk"
    for cache, orig in zip(caches, before, strict=True):
        assert torch.equal(bits(whole_storage(cache)), bits(whole_storage(orig))), (
            "gather wrote the cache"
        )

    # Scatter into a fresh cache full of different random poison.
    gen = torch.Generator().manual_seed(case.seed + 1)
    num_blocks = caches[0].shape[0]
    fresh = [make_cache(layout, num_blocks, pad=case.pad, gen=gen) for _ in range(layers)]
    want = [clone_cache(c) for c in fresh]
    reference_scatter(expect, want, layout, table, start, end)
    scatter(out, fresh, layout, block_ids, start, end, impl=impl)
    for layer, (got, exp) in enumerate(zip(fresh, want, strict=True)):
        assert torch.equal(bits(whole_storage(got)), bits(whole_storage(exp))), (
            f"scatter changed the wrong elements in layer {layer}: {case}"
        )

    # Round trip: what was scattered gathers back bit for bit.
    again = torch.empty_like(out)
    gather(fresh, layout, block_ids, start, end, again, impl=impl)
    assert torch.equal(bits(again), bits(out)), f"round trip is not exact: {case}"
