"""Shared factories and the plain-index reference for the kernel tests.

The reference never uses :meth:`KVLayout.token_views`: it spells out, per kind, where vLLM keeps
element (block, head, slot, dim) of K and V (see ``kernels/layouts.py``), one token at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmcache_disagg.kernels import KVLayout

KINDS = ("cpu", "cpu_amx", "flash_nhd", "flash_hnd", "mla")


def compatible(kind: str, dtype: torch.dtype, block_size: int, head_dim: int) -> bool:
    """Whether the kind can hold that geometry (vLLM's AMX tiles need 16-multiples, 2 bytes)."""
    if kind != "cpu_amx":
        return True
    return block_size % 16 == 0 and head_dim % 16 == 0 and dtype.itemsize == 2


DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def make_caches(
    layout: KVLayout,
    num_layers: int,
    num_blocks: int,
    *,
    pad: int = 0,
    shared: bool = False,
    gen: torch.Generator | None = None,
) -> list[torch.Tensor]:
    """Per-layer caches with vLLM's strides for ``layout.kind``, filled with random values.

    ``pad`` > 0 leaves that many elements between blocks (vLLM pads pages and, in block-outer
    layouts, puts other layers' pages there), so blocks are not evenly packed. ``shared`` puts all
    layers in one allocation, equally spaced (vLLM's layer-outermost group tensor); otherwise each
    layer has its own storage.
    """
    b, h, n, c = layout.cache_shape(num_blocks)
    block_stride = h * n * c + pad
    layer_elems = num_blocks * block_stride + 3
    if layout.kind == "flash_nhd":
        stride = (block_stride, c, h * c, 1)
    else:
        stride = (block_stride, n * c, c, 1)
    if shared:
        raw = torch.randn(num_layers * layer_elems, generator=gen).to(layout.dtype)
        raws = [raw] * num_layers
    else:
        raws = [torch.randn(layer_elems, generator=gen).to(layout.dtype) for _ in range(num_layers)]
    # Offset 3 within each layer: views that do not start their storage must work too.
    return [
        r.as_strided((b, h, n, c), stride, 3 + (layer * layer_elems if shared else 0))
        for layer, r in enumerate(raws)
    ]


def _region_index(layout: KVLayout, slot: int, kv: int) -> torch.Tensor:
    """Offsets of one token's ``head_dim`` elements of K or V inside a (block, head) region of
    the CPU backend, which holds ``N*D`` K elements then ``N*D`` V elements."""
    n, d = layout.block_size, layout.head_dim
    dims = torch.arange(d)
    if layout.kind == "cpu":  # K as (D, N), V as (N, D): cpu_attn_reshape_and_cache, vec ISAs
        return dims * n + slot if kv == 0 else n * d + slot * d + dims
    # cpu_amx: K as [N/16, D/2, 16, 2], V as [D/16, N/2, 16, 2] (VNNI pairs), isa="amx"
    if kv == 0:
        return (slot // 16) * 16 * d + (dims // 2) * 32 + (slot % 16) * 2 + dims % 2
    return n * d + (dims // 16) * 16 * n + (slot // 2) * 32 + (dims % 16) * 2 + slot % 2


def _regions(layout: KVLayout, cache: torch.Tensor, block: int) -> list[torch.Tensor]:
    regions = [cache[block, h] for h in range(layout.num_kv_heads)]
    assert all(r.is_contiguous() for r in regions)
    return [r.view(-1) for r in regions]


def _locate(layout: KVLayout, cache: torch.Tensor, block: int, slot: int, kv: int) -> torch.Tensor:
    """The ``[heads, head_dim]`` values of one token's K (kv=0) or V (kv=1)."""
    d = layout.head_dim
    if layout.kind == "mla":
        return cache[block, :, slot, :]
    if layout.kind in ("cpu", "cpu_amx"):
        idx = _region_index(layout, slot, kv)
        return torch.stack([r[idx] for r in _regions(layout, cache, block)])
    return cache[block, :, slot, kv * d : (kv + 1) * d]


def _write(
    layout: KVLayout, cache: torch.Tensor, block: int, slot: int, kv: int, x: torch.Tensor
) -> None:
    if layout.kind in ("cpu", "cpu_amx"):
        idx = _region_index(layout, slot, kv)
        for h, region in enumerate(_regions(layout, cache, block)):
            region[idx] = x[h]
        return
    _locate(layout, cache, block, slot, kv).copy_(x)


def reference_gather(
    caches: list[torch.Tensor], layout: KVLayout, block_ids: list[int], start: int, end: int
) -> torch.Tensor:
    out = torch.empty(layout.chunk_shape(len(caches), end - start), dtype=layout.dtype)
    for layer, cache in enumerate(caches):
        for i, t in enumerate(range(start, end)):
            block, slot = block_ids[t // layout.block_size], t % layout.block_size
            for kv in range(layout.num_kv):
                out[layer, kv, i] = _locate(layout, cache, block, slot, kv)
    return out


def reference_scatter(
    chunk: torch.Tensor,
    caches: list[torch.Tensor],
    layout: KVLayout,
    block_ids: list[int],
    start: int,
    end: int,
) -> None:
    for layer, cache in enumerate(caches):
        for i, t in enumerate(range(start, end)):
            block, slot = block_ids[t // layout.block_size], t % layout.block_size
            for kv in range(layout.num_kv):
                _write(layout, cache, block, slot, kv, chunk[layer, kv, i])


def whole_storage(cache: torch.Tensor) -> torch.Tensor:
    """Every element of the storage behind ``cache``, padding included, as a flat tensor."""
    flat = torch.empty(0, dtype=cache.dtype)
    flat.set_(
        cache.untyped_storage(), 0, (cache.untyped_storage().nbytes() // cache.element_size(),)
    )
    return flat


def clone_cache(cache: torch.Tensor) -> torch.Tensor:
    """A deep copy that keeps the strides, storage offset and padding of ``cache``."""
    raw = whole_storage(cache).clone()
    return raw.as_strided(cache.shape, cache.stride(), cache.storage_offset())


def bits(t: torch.Tensor) -> torch.Tensor:
    """Compare tensors bit for bit (NaN-safe, -0.0 != 0.0)."""
    return (
        t.contiguous().view(torch.uint8)
        if t.element_size() == 1
        else t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
    )


@dataclass(frozen=True)
class Case:
    """One gather/scatter scenario."""

    kind: str
    dtype: torch.dtype
    block_size: int
    num_tokens: int
    token_start: int
    num_layers: int = 2
    num_kv_heads: int = 2
    head_dim: int = 16
    pad: int = 0
    spare_blocks: int = 2
    seed: int = 0
    shared: bool = True
    blocks: str = "shuffled"
    """The block table: "shuffled" (a random permutation), "consecutive" (ascending ids, so whole
    blocks merge into spans), or "mixed" (ascending runs broken by gaps and a backwards step)."""

    @property
    def token_end(self) -> int:
        return self.token_start + self.num_tokens

    def layout(self) -> KVLayout:
        heads = 1 if self.kind == "mla" else self.num_kv_heads
        return KVLayout(self.kind, self.block_size, heads, self.head_dim, self.dtype)  # type: ignore[arg-type]

    def build(self) -> tuple[KVLayout, list[torch.Tensor], list[int]]:
        """Layout, per-layer caches with random contents, and a shuffled block table."""
        gen = torch.Generator().manual_seed(self.seed)
        layout = self.layout()
        used = -(-self.token_end // self.block_size)
        num_blocks = used + self.spare_blocks
        caches = make_caches(
            layout, self.num_layers, num_blocks, pad=self.pad, shared=self.shared, gen=gen
        )
        if self.blocks == "consecutive":
            table = list(range(1, used + 1))  # block 0 and the spares stay poison
        elif self.blocks == "mixed":
            picked = torch.randperm(num_blocks, generator=gen)[:used].sort().values.tolist()
            if used >= 4:
                picked[used // 2], picked[used // 2 + 1] = picked[used // 2 + 1], picked[used // 2]
            table = picked
        else:
            table = torch.randperm(num_blocks, generator=gen)[:used].tolist()
        return layout, caches, table
