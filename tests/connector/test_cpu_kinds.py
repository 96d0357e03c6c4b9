"""The connector picks the CPU layout kind from the ISA vLLM's CPU attention uses.

An Intel AMX host runs bf16 caches with ``block_size % 32 == 0`` under the ``amx`` ISA, whose K/V
tiles are the ``cpu_amx`` kind; every other x86 case is ``vec``/``vec16`` (the ``cpu`` kind). A
connector that only knew ``cpu`` went inactive on AMX hosts (no KV listener, every prompt
recomputed on D), so both kinds are accepted, an unknown ISA is refused by name, and a chunk moves
between the two kinds unchanged (a P on an AMX host can feed a D without AMX).
"""

from __future__ import annotations

import pytest
import torch
from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

from lmcache_disagg.connector.errors import UnsupportedLayout
from lmcache_disagg.connector.kvcache import describe_kv_caches
from lmcache_disagg.kernels import KVLayout, gather, scatter

BLOCK, HEADS, HEAD_DIM, LAYERS, BLOCKS = 32, 2, 64, 2, 6


def _caches(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shape = (BLOCKS, HEADS, BLOCK, 2 * HEAD_DIM)
    return {
        f"model.layers.{i}.self_attn.attn": torch.randn(shape, generator=gen).to(torch.bfloat16)
        for i in range(LAYERS)
    }


def _describe(caches: dict[str, torch.Tensor], cpu_isa: str | None) -> KVLayout:
    described = describe_kv_caches(
        caches, model="m", chunk_size=32, tp_rank=0, tp_size=1, use_mla=False, cpu_isa=cpu_isa
    )
    assert described.fingerprint.kv_layout == "canonical-v1"
    return described.layout


@pytest.mark.parametrize("isa,kind", [("vec", "cpu"), ("vec16", "cpu"), ("amx", "cpu_amx")])
def test_the_isa_picks_the_kind(isa: str, kind: str) -> None:
    layout = _describe(_caches(0), isa)
    assert (layout.kind, layout.block_size, layout.head_dim) == (kind, BLOCK, HEAD_DIM)


def test_this_hosts_isa_is_what_vllm_picks() -> None:
    isa = _get_attn_isa(torch.bfloat16, BLOCK, HEAD_DIM)
    assert _describe(_caches(0), None).kind == ("cpu_amx" if isa == "amx" else "cpu")


def test_an_unknown_isa_is_refused_by_name() -> None:
    with pytest.raises(UnsupportedLayout, match="'neon'"):
        _describe(_caches(0), "neon")


def test_amx_needs_a_two_byte_dtype() -> None:
    fp32 = {name: cache.float() for name, cache in _caches(0).items()}
    with pytest.raises(UnsupportedLayout, match="cpu_amx"):
        _describe(fp32, "amx")


def test_a_chunk_moves_between_the_kinds_unchanged() -> None:
    """The canonical chunk of an AMX cache, written into a vec cache, reads back the same."""
    source, target = _caches(1), _caches(2)
    amx, vec = _describe(source, "amx"), _describe(target, "vec")
    start, end = 7, 7 + 3 * BLOCK
    chunk = torch.empty(amx.chunk_shape(LAYERS, end - start), dtype=torch.bfloat16)
    gather(list(source.values()), amx, torch.tensor([4, 1, 5, 0]), start, end, chunk)
    scatter(chunk, list(target.values()), vec, torch.tensor([2, 3, 0, 5]), start, end)
    back = torch.empty_like(chunk)
    gather(list(target.values()), vec, torch.tensor([2, 3, 0, 5]), start, end, back)
    assert torch.count_nonzero(chunk) > 0
    assert torch.equal(chunk, back)
