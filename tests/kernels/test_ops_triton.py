"""The Triton kernels on CPU tensors under ``TRITON_INTERPRET=1``: the same checks as the torch
implementation. The interpreter runs every program in numpy, so shapes stay small."""

from __future__ import annotations

import importlib
from collections.abc import Iterator

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tests.kernels.cases import check_case
from tests.kernels.utils import DTYPES, KINDS, Case, compatible

GRID = [
    (kind, dtype, block_size, num_tokens)
    for kind in KINDS
    for dtype in DTYPES
    for block_size in (1, 16, 128)
    for num_tokens in (1, 7, 256)
    if compatible(kind, dtype, block_size, 16)
]


@pytest.fixture(scope="module", autouse=True)
def triton_interpreter() -> Iterator[None]:
    """Run this module with ``TRITON_INTERPRET=1``.

    Triton reads the variable when a kernel is decorated and again while it runs, so it is set for
    the module's duration, and ``triton_impl`` is (re)imported under it.
    """
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        from lmcache_disagg.kernels import triton_impl

        if type(triton_impl._gather_kernel).__name__ != "InterpretedFunction":
            importlib.reload(triton_impl)
        assert triton_impl.HAS_TRITON
        assert type(triton_impl._gather_kernel).__name__ == "InterpretedFunction"
        yield


@pytest.mark.parametrize("kind,dtype,block_size,num_tokens", GRID, ids=str)
def test_grid(kind: str, dtype: torch.dtype, block_size: int, num_tokens: int) -> None:
    start = block_size // 2 + 3
    check_case(Case(kind, dtype, block_size, num_tokens, start), "triton")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shared", [True, False], ids=["one-allocation", "per-layer"])
def test_padded_blocks(kind: str, shared: bool) -> None:
    check_case(Case(kind, torch.bfloat16, 16, 40, 5, num_layers=3, pad=24, shared=shared), "triton")


@settings(max_examples=25, deadline=None)
@given(
    kind=st.sampled_from(KINDS),
    dtype=st.sampled_from(DTYPES),
    block_size=st.sampled_from([1, 5, 16, 128]),
    num_tokens=st.sampled_from([1, 7, 33, 256]),
    offset=st.integers(0, 300),
    num_kv_heads=st.integers(1, 3),
    head_dim=st.sampled_from([1, 8, 12, 16]),
    pad=st.sampled_from([0, 8]),
    shared=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random(
    kind: str,
    dtype: torch.dtype,
    block_size: int,
    num_tokens: int,
    offset: int,
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
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        pad=pad,
        seed=seed,
        shared=shared,
    )
    check_case(case, "triton")
