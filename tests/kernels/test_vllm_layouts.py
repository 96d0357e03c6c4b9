"""Our layout kinds against the real vLLM 0.32 code that writes and views the KV cache.

* ``cpu`` / ``cpu_amx``: vLLM's own CPU op ``cpu_attn_reshape_and_cache`` writes K/V, with the
  ISA that ``cpu_attn._get_attn_isa`` picks on this machine, with both x86 non-AMX ISAs, and with
  ``isa="amx"`` (only its tile layout is exercised: the reshape op needs no AMX hardware).
* ``flash_nhd`` / ``flash_hnd``: per-layer views from ``create_kv_cache_views`` for each
  resolved ``KVCacheLayout``, written through the split that ``FlashAttentionImpl`` uses
  (the CUDA ``reshape_and_cache_flash`` op cannot run here; it stores ``key[i]`` at
  ``key_cache[slot // block_size, slot % block_size]``).
* ``mla``: ``CPUMLAImpl.do_kv_cache_update`` on a view of an ``MLAAttentionSpec``.

Each test gathers what vLLM wrote and compares it with the K/V it was given, then scatters that
back into a zeroed cache and checks the bytes are identical to what vLLM produced.
"""

from __future__ import annotations

import pytest
import torch
from vllm import _custom_ops as ops
from vllm.v1.attention.backends.cpu_attn import _get_attn_isa
from vllm.v1.attention.backends.mla.cpu_mla import CPUMLAImpl
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheTensor,
    MLAAttentionSpec,
    compute_layout_strides,
    create_kv_cache_views,
)
from vllm.v1.kv_cache_layout import KVCacheLayout

from lmcache_disagg.kernels import KVLayout, LayoutError, gather, scatter

NUM_LAYERS = 3
NUM_BLOCKS = 12


def _vllm_views(
    spec: FullAttentionSpec, layout: KVCacheLayout
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The raw int8 allocation and per-layer views, built as vLLM's KV cache config does."""
    page = spec.page_size_bytes
    block_stride = NUM_LAYERS * page if layout.is_block_outermost else None
    layer_stride, block_stride, *_ = compute_layout_strides(
        spec, NUM_BLOCKS, NUM_LAYERS, layout, fixed_strides=(None, block_stride, None, None, None)
    )
    size = NUM_LAYERS * NUM_BLOCKS * page
    tensor = KVCacheTensor(
        size=size,
        layers=[f"layer.{i}" for i in range(NUM_LAYERS)],
        layer_stride=layer_stride,
        block_stride=block_stride,
    )
    raw = torch.zeros(size, dtype=torch.int8)
    return raw, create_kv_cache_views(raw, spec, NUM_BLOCKS, layout, tensor)


def _request(block_size: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A shuffled block table and vLLM's slot mapping for tokens [start, end)."""
    gen = torch.Generator().manual_seed(block_size)
    table = torch.randperm(NUM_BLOCKS, generator=gen)[: -(-end // block_size)]
    pos = torch.arange(start, end)
    return table, table[pos // block_size] * block_size + pos % block_size


def _kv(
    n: int, heads: int, dim: int, dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, heads, dim, generator=gen).to(dtype),
            torch.randn(n, heads, dim, generator=gen).to(dtype))  # fmt: skip


def _check_round_trip(
    kind: str,
    views: list[torch.Tensor],
    raw: torch.Tensor,
    fresh_views: list[torch.Tensor],
    fresh_raw: torch.Tensor,
    table: torch.Tensor,
    start: int,
    end: int,
    expected: list[tuple[torch.Tensor, ...]],
) -> None:
    layout = KVLayout.from_cache(kind, views[0])  # type: ignore[arg-type]
    out = torch.empty(layout.chunk_shape(len(views), end - start), dtype=layout.dtype)
    gather(views, layout, table, start, end, out)
    for layer, tensors in enumerate(expected):
        for kv, t in enumerate(tensors):
            assert torch.equal(out[layer, kv], t), f"{kind}: layer {layer} {'KV'[kv]} differs"
    scatter(out, fresh_views, layout, table, start, end)
    assert torch.equal(fresh_raw, raw), f"{kind}: scatter wrote other bytes than vLLM"


def _cpu_backend_case(
    kind: str, isa: str, dtype: torch.dtype, block_size: int, head_size: int
) -> None:
    heads, start, end = 3, 5, 5 + 2 * block_size + 7
    spec = FullAttentionSpec(
        block_size=block_size, num_kv_heads=heads, head_size=head_size, dtype=dtype
    )
    raw, views = _vllm_views(spec, KVCacheLayout.LBHNC)  # the only layout CPU_ATTN supports
    table, slots = _request(block_size, start, end)
    expected = []
    for layer, view in enumerate(views):
        key, value = _kv(end - start, heads, head_size, dtype, layer)
        # As CPUAttentionBackendImpl.do_kv_cache_update splits the layer cache.
        b, h, n, _ = view.shape
        key_cache, value_cache = view.view(b, h, 2 * n, -1).chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, isa)
        expected.append((key, value))
    fresh_raw, fresh_views = _vllm_views(spec, KVCacheLayout.LBHNC)
    _check_round_trip(kind, views, raw, fresh_views, fresh_raw, table, start, end, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("block_size,head_size", [(16, 64), (32, 64), (32, 48)])
@pytest.mark.parametrize("isa", ["auto", "vec", "vec16"])
def test_cpu_backend(dtype: torch.dtype, block_size: int, head_size: int, isa: str) -> None:
    if isa == "auto":
        isa = _get_attn_isa(dtype, block_size, head_size)
        # x86 without AMX picks vec/vec16 (the cpu kind); an AMX host picks amx for bf16 with
        # block_size % 32 == 0, which is the cpu_amx kind.
        assert isa in ("vec", "vec16", "amx"), isa
    kind = "cpu_amx" if isa == "amx" else "cpu"
    _cpu_backend_case(kind, isa, dtype, block_size, head_size)


@pytest.mark.parametrize("block_size,head_size", [(32, 64), (64, 128), (128, 32), (32, 256)])
def test_cpu_backend_amx(block_size: int, head_size: int) -> None:
    """The AMX ISA (bf16, block_size % 32 == 0) tiles K and V; its reshape op runs here too."""
    _cpu_backend_case("cpu_amx", "amx", torch.bfloat16, block_size, head_size)


@pytest.mark.parametrize(
    "vllm_layout,kind",
    [
        (KVCacheLayout.LBNHC, "flash_nhd"),
        (KVCacheLayout.BLNHC, "flash_nhd"),
        (KVCacheLayout.LBHNC, "flash_hnd"),
        (KVCacheLayout.BLHNC, "flash_hnd"),
    ],
    ids=lambda v: getattr(v, "name", v),
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_flash_attention(vllm_layout: KVCacheLayout, kind: str, dtype: torch.dtype) -> None:
    heads, head_size, block_size, start, end = 4, 16, 16, 3, 50
    spec = FullAttentionSpec(
        block_size=block_size, num_kv_heads=heads, head_size=head_size, dtype=dtype
    )
    raw, views = _vllm_views(spec, vllm_layout)
    table, slots = _request(block_size, start, end)
    expected = []
    for layer, view in enumerate(views):
        key, value = _kv(end - start, heads, head_size, dtype, layer)
        # (B, H, N, 2*D) -> ((B, N, H, D), (B, N, H, D)), as FlashAttentionImpl.do_kv_cache_update.
        key_cache, value_cache = view.transpose(1, 2).split(head_size, dim=-1)
        key_cache[slots // block_size, slots % block_size] = key
        value_cache[slots // block_size, slots % block_size] = value
        expected.append((key, value))
    other = "flash_hnd" if kind == "flash_nhd" else "flash_nhd"
    with pytest.raises(LayoutError, match="stride"):
        KVLayout.from_cache(other, views[0])  # type: ignore[arg-type]
    fresh_raw, fresh_views = _vllm_views(spec, vllm_layout)
    _check_round_trip(kind, views, raw, fresh_views, fresh_raw, table, start, end, expected)


@pytest.mark.parametrize("squeezed", [False, True])
def test_mla(squeezed: bool) -> None:
    kv_lora_rank, rope_dim, block_size, start, end = 64, 16, 16, 9, 41
    dtype = torch.bfloat16
    spec = MLAAttentionSpec(
        block_size=block_size, num_kv_heads=1, head_size=kv_lora_rank + rope_dim, dtype=dtype
    )
    raw, views = _vllm_views(spec, KVCacheLayout.LBNHC)
    table, slots = _request(block_size, start, end)
    expected = []
    for layer, view in enumerate(views):
        latent, pe = (
            _kv(end - start, 1, kv_lora_rank, dtype, layer)[0],
            _kv(end - start, 1, rope_dim, dtype, 99)[0],
        )
        CPUMLAImpl.do_kv_cache_update(None, latent[:, 0], pe, view, slots, "auto", None)  # type: ignore[arg-type]
        expected.append((torch.cat([latent, pe], dim=-1),))
    fresh_raw, fresh_views = _vllm_views(spec, KVCacheLayout.LBNHC)
    if squeezed:  # MLAAttention.bind_kv_cache: [B, 1, N, C] -> [B, N, C]
        views = [v.squeeze(1) for v in views]
        fresh_views = [v.squeeze(1) for v in fresh_views]
    _check_round_trip("mla", views, raw, fresh_views, fresh_raw, table, start, end, expected)
