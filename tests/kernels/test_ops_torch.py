"""Torch implementation (the CPU path and the reference) against the plain-index reference,
for both of its strategies (block-run copies and index kernels)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tests.kernels.cases import Impl, check_case
from tests.kernels.utils import DTYPES, KINDS, Case, compatible

GRID = [
    (kind, dtype, block_size, num_tokens)
    for kind in KINDS
    for dtype in DTYPES
    for block_size in (1, 16, 128)
    for num_tokens in (1, 7, 256)
    if compatible(kind, dtype, block_size, 16)
]
IMPLS = ("torch", "torch-index")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind,dtype,block_size,num_tokens", GRID, ids=str)
def test_grid(kind: str, dtype: torch.dtype, block_size: int, num_tokens: int, impl: Impl) -> None:
    # Starts mid-block, so the chunk straddles blocks and ends in a partial block.
    start = block_size // 2 + 3
    check_case(Case(kind, dtype, block_size, num_tokens, start), impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shared", [True, False], ids=["one-allocation", "per-layer"])
def test_padded_blocks(kind: str, shared: bool, impl: Impl) -> None:
    """Blocks that are not densely packed (padded pages / block-outer layouts)."""
    check_case(Case(kind, torch.bfloat16, 16, 40, 5, num_layers=3, pad=24, shared=shared), impl)


@pytest.mark.parametrize("kind", KINDS)
def test_aligned_full_chunk(kind: str) -> None:
    """The common case: a whole 256-token chunk at a chunk boundary."""
    check_case(Case(kind, torch.bfloat16, 16, 256, 512, num_layers=4), "torch")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("blocks", ["consecutive", "mixed"])
@pytest.mark.parametrize(("start", "num_tokens"), [(0, 256), (5, 256), (32, 40), (3, 7)])
def test_consecutive_blocks_merge_into_spans(
    kind: str, blocks: str, start: int, num_tokens: int, impl: Impl
) -> None:
    """Whole blocks with consecutive ids move as one span; partial first/last blocks, gaps and
    backwards steps in the table still land exactly (and nothing else is touched)."""
    for shared, pad in ((True, 0), (False, 24)):
        case = Case(kind, torch.bfloat16, 16, num_tokens, start, num_layers=3, pad=pad,
                    shared=shared, blocks=blocks, spare_blocks=6)  # fmt: skip
        check_case(case, impl)


def test_block_spans() -> None:
    from lmcache_disagg.kernels.torch_impl import block_runs, block_spans

    ids = torch.tensor([7, 8, 9, 3, 4, 11])
    spans, rest = block_spans(block_runs(4, ids, 2, 22), 4)
    # tokens 2..3 sit in block 7 (partial), 4..11 in 8, 9 (one span), 12..19 in 3, 4, 20..21 in 11
    assert spans == [(2, 8, 2), (10, 3, 2)]
    assert rest == [(0, 7, 2, 2), (18, 11, 0, 2)]


@settings(max_examples=50, deadline=None)
@given(
    impl=st.sampled_from(IMPLS),
    kind=st.sampled_from(KINDS),
    dtype=st.sampled_from(DTYPES),
    block_size=st.sampled_from([1, 2, 5, 16, 128]),
    num_tokens=st.sampled_from([1, 7, 33, 256]),
    offset=st.integers(0, 300),
    num_layers=st.integers(1, 3),
    num_kv_heads=st.integers(1, 3),
    head_dim=st.sampled_from([1, 8, 12, 16, 32]),
    pad=st.sampled_from([0, 0, 8]),
    shared=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random(
    impl: Impl,
    kind: str,
    dtype: torch.dtype,
    block_size: int,
    num_tokens: int,
    offset: int,
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    pad: int,
    shared: bool,
    seed: int,
) -> None:
    assume(compatible(kind, dtype, block_size, head_dim))
    case = Case(
        kind,
        dtype,
        block_size,
        num_tokens,
        token_start=offset,
        num_layers=num_layers,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        pad=pad,
        seed=seed,
        shared=shared,
    )
    check_case(case, impl)
