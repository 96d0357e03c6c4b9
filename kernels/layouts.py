"""How vLLM 0.32 lays out one layer's paged KV cache, and the canonical chunk layout.

vLLM 0.32 (RFC #42082) hands every attention layer a 4-D *logical* view ``[B, H, N, C]``
(blocks, head slots, tokens per block, content) built by
``vllm.v1.kv_cache_interface.create_kv_cache_views``; the physical order of those axes is the
resolved ``vllm.v1.kv_cache_layout.KVCacheLayout`` (a stride permutation), and the block and layer
strides may include padding or other layers' pages. What ``C`` holds, and how K and V share it,
is decided by the attention backend. The kinds we support, each mirroring named vLLM code
(which kind applies is the connector's decision: it knows the backend and, on CPU, the ISA that
``vllm.v1.attention.backends.cpu_attn._get_attn_isa`` picks):

``cpu``
    ``vllm.v1.attention.backends.cpu_attn.CPUAttentionBackend`` (``supported_kv_cache_layouts``
    returns only ``LBHNC``). Logical ``[B, H, N, 2*D]`` with each (block, head) region dense.
    ``CPUAttentionBackendImpl.do_kv_cache_update`` reinterprets it as ``[B, H, 2*N, D]`` and takes
    ``chunk(2, dim=2)``: the first ``N*D`` elements of a region belong to K, the next ``N*D`` to V,
    so K and V are NOT split along the last axis. ``torch.ops._C.cpu_attn_reshape_and_cache`` with
    ``isa`` ``"vec"``/``"vec16"`` (what ``cpu_attn._get_attn_isa`` picks on x86 without AMX, and
    always when ``block_size % 32 != 0``) then stores K *transposed*, ``[D, N]`` (token fastest),
    and V plain, ``[N, D]``. ARM/Power/s390x/RISC-V ISAs could not be checked here (their kernels
    are not in the x86 wheel); the connector must refuse (recompute) when vLLM picks one.
``cpu_amx``
    The same backend when ``_get_attn_isa`` returns ``"amx"`` (Intel AMX, bf16,
    ``block_size % 32 == 0``): ``cpu_attn_reshape_and_cache`` packs each region's K as
    ``[N/16, D/2, 16, 2]`` (16-token tiles, VNNI pairs of dims) and V as ``[D/16, N/2, 16, 2]``
    (16-dim tiles, VNNI pairs of tokens). Decoded from the real op, which runs without AMX
    hardware; verified in ``tests/kernels/test_vllm_layouts.py``.
``flash_nhd`` / ``flash_hnd``
    ``vllm.v1.attention.backends.flash_attn.FlashAttentionImpl.do_kv_cache_update`` (and
    FlashInfer): ``kv_cache.transpose(1, 2).split(head_size, dim=-1)``, i.e. logical
    ``[B, H, N, 2*D]`` where K is ``C[:D]`` and V is ``C[D:]`` of each (token, head) cell.
    ``flash_nhd`` is ``KVCacheLayout.LBNHC`` (legacy name ``NHD``; physical ``[B, N, H, 2D]``,
    token-major, vLLM's default preference), ``flash_hnd`` is ``KVCacheLayout.LBHNC`` (``HND``;
    physical ``[B, H, N, 2D]``). The block-outer variants (``BLNHC``/``BLHNC``) only change the
    block stride, which we read from the tensor. The pre-0.32 shape
    ``[2, num_blocks, block_size, kv_heads, head_size]`` does not exist in 0.32.
``mla``
    ``vllm.v1.kv_cache_interface.MLAAttentionSpec`` (``head_size_v == 0``, one head slot) and
    ``MLAAttention.bind_kv_cache`` (``[B, H=1, N, C] -> [B, N, C]``): one latent vector
    ``kv_lora_rank + qk_rope_head_dim`` per token, no separate V. Accepted as ``[B, 1, N, C]`` or
    ``[B, N, C]``; the chunk is ``[layers, 1, tokens, 1, C]``.

Kernel-block splitting (``vllm.v1.kv_cache_interface.group_kernel_blocks``): when vLLM splits a
manager block into ``r`` kernel blocks, the layer view's ``N`` is the kernel block size and
``B`` counts kernel blocks; expand a manager block table with :func:`expand_block_ids`.

Quantized (fp8) caches are moved byte for byte like any other dtype, but their per-ISA packing
was not checked here.

The canonical chunk (DESIGN.md) is ``[layers, 2, tokens, kv_heads, head_dim]`` (``[layers, 1,
tokens, 1, latent]`` for MLA), contiguous, in the cache dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from lmcache_disagg.kernels.errors import ChunkError, LayoutError

__all__ = [
    "KVLayout",
    "LayerGroup",
    "LayoutKind",
    "chunk_view",
    "expand_block_ids",
    "layer_groups",
    "stack_layers",
]

LayoutKind = Literal["cpu", "cpu_amx", "flash_nhd", "flash_hnd", "mla"]
LAYOUT_KINDS: tuple[str, ...] = get_args(LayoutKind)

# Expected logical shape per kind, for error messages.
_EXPECTED: dict[str, str] = {
    "cpu": "[num_blocks, num_kv_heads, block_size, 2*head_size] with each (block, head) region "
    "dense (strides [*, block_size*2*head_size, 2*head_size, 1])",
    "cpu_amx": "[num_blocks, num_kv_heads, block_size, 2*head_size] with each (block, head) "
    "region dense, block_size % 16 == 0 and head_size % 16 == 0, 2-byte dtype",
    "flash_nhd": "[num_blocks, num_kv_heads, block_size, 2*head_size] with token-major strides "
    "[*, 2*head_size, num_kv_heads*2*head_size, 1] (vLLM LBNHC/NHD)",
    "flash_hnd": "[num_blocks, num_kv_heads, block_size, 2*head_size] with head-major strides "
    "[*, block_size*2*head_size, 2*head_size, 1] (vLLM LBHNC/HND)",
    "mla": "[num_blocks, 1, block_size, latent_dim] or [num_blocks, block_size, latent_dim] "
    "with strides [*, (*,) latent_dim, 1]",
}


@dataclass(frozen=True)
class KVLayout:
    """One per-layer vLLM KV cache layout; immutable, hashable, cheap to build.

    ``head_dim`` is the per-head size of K (and V); for ``mla`` it is the latent size
    (``kv_lora_rank + rope_dim``) and ``num_kv_heads`` is 1.
    """

    kind: LayoutKind
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    def __post_init__(self) -> None:
        if self.kind not in LAYOUT_KINDS:
            raise LayoutError(
                f"unknown KV layout kind {self.kind!r}; expected one of {LAYOUT_KINDS}"
            )
        for name in ("block_size", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise LayoutError(f"KVLayout.{name} must be a positive int, got {value!r}")
        if not isinstance(self.dtype, torch.dtype):
            raise LayoutError(f"KVLayout.dtype must be a torch.dtype, got {self.dtype!r}")
        if self.kind == "cpu_amx" and (
            self.block_size % _AMX_K_TOKENS or self.head_dim % _AMX_V_DIMS or self.itemsize != 2
        ):
            raise LayoutError(f"cpu_amx KV cache must be {_EXPECTED['cpu_amx']}, got {self}")
        if self.kind == "mla" and self.num_kv_heads != 1:
            raise LayoutError(f"an mla layout has exactly one head slot, got {self.num_kv_heads}")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_cache(cls, kind: LayoutKind, kv_cache: torch.Tensor) -> KVLayout:
        """Describe ``kv_cache`` (one layer's tensor as vLLM 0.32 binds it) as a ``kind`` layout.

        Raises :class:`LayoutError` naming the expected shape and strides when the tensor's rank,
        shape or strides do not fit ``kind``. Called once per worker at cache registration.
        """
        if kind not in LAYOUT_KINDS:
            raise LayoutError(f"unknown KV layout kind {kind!r}; expected one of {LAYOUT_KINDS}")
        if not isinstance(kv_cache, torch.Tensor):
            raise LayoutError(f"kv_cache must be a torch.Tensor, got {type(kv_cache).__name__}")
        shape = tuple(kv_cache.shape)
        if kind == "mla":
            if kv_cache.dim() == 3:
                _, block_size, content = shape
            elif kv_cache.dim() == 4 and shape[1] == 1:
                _, _, block_size, content = shape
            else:
                raise LayoutError(
                    f"mla KV cache must be {_EXPECTED[kind]}, got shape {list(shape)}"
                )
            layout = cls(kind, block_size, 1, content, kv_cache.dtype)
        else:
            if kv_cache.dim() != 4 or shape[3] % 2 != 0:
                raise LayoutError(
                    f"{kind} KV cache must be {_EXPECTED[kind]}, got shape {list(shape)}"
                )
            _, heads, block_size, content = shape
            layout = cls(kind, block_size, heads, content // 2, kv_cache.dtype)
        layout.check_cache(kv_cache)
        return layout

    # ------------------------------------------------------------------ canonical chunk
    @property
    def num_kv(self) -> int:
        """2 (K and V) for the attention layouts, 1 for the MLA latent."""
        return 1 if self.kind == "mla" else 2

    def chunk_shape(self, num_layers: int, num_tokens: int) -> tuple[int, ...]:
        """``[layers, 2, tokens, kv_heads, head_dim]`` (``[layers, 1, tokens, 1, latent]`` for MLA)."""
        if num_layers <= 0 or num_tokens < 0:
            raise ChunkError(f"bad chunk dims: num_layers={num_layers}, num_tokens={num_tokens}")
        return (num_layers, self.num_kv, num_tokens, self.num_kv_heads, self.head_dim)

    def chunk_bytes(self, num_layers: int, num_tokens: int) -> int:
        """Bytes of a contiguous chunk of ``num_tokens`` tokens for ``num_layers`` layers."""
        return math.prod(self.chunk_shape(num_layers, num_tokens)) * self.itemsize

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    # ------------------------------------------------------------------ paged cache
    def cache_shape(self, num_blocks: int) -> tuple[int, ...]:
        """The logical per-layer shape vLLM 0.32 binds (``[B, H, N, C]``)."""
        content = self.head_dim if self.kind == "mla" else 2 * self.head_dim
        return (num_blocks, self.num_kv_heads, self.block_size, content)

    def empty_cache(self, num_blocks: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Allocate one layer's cache with the strides vLLM uses for this kind (tests, bench)."""
        return self.empty_caches(1, num_blocks, device)[0]

    def empty_caches(
        self, num_layers: int, num_blocks: int, device: torch.device | str = "cpu"
    ) -> list[torch.Tensor]:
        """Per-layer caches carved out of one allocation, layer outermost, as vLLM 0.32's
        ``create_kv_cache_views`` lays out a cache group (tests, bench, demos)."""
        b, h, n, c = self.cache_shape(num_blocks)
        if self.kind == "flash_nhd":
            whole = torch.empty((num_layers, b, n, h, c), dtype=self.dtype, device=device)
            return [layer.transpose(1, 2) for layer in whole.unbind(0)]
        whole = torch.empty((num_layers, b, h, n, c), dtype=self.dtype, device=device)
        return list(whole.unbind(0))

    def check_cache(self, kv_cache: torch.Tensor) -> None:
        """Raise :class:`LayoutError` unless ``kv_cache`` is one layer's cache in this layout."""
        if kv_cache.dtype != self.dtype:
            raise LayoutError(f"KV cache dtype {kv_cache.dtype} != layout dtype {self.dtype}")
        cache = _as_4d(self, kv_cache)
        b, h, n, c = cache.shape
        expect = self.cache_shape(b)
        if tuple(cache.shape) != expect:
            raise LayoutError(
                f"{self.kind} KV cache must be {_EXPECTED[self.kind]}; expected shape "
                f"{list(expect)}, got {list(kv_cache.shape)}"
            )
        _, s_h, s_n, s_c = cache.stride()
        want: dict[str, tuple[int, int, int]] = {
            # (stride of H, stride of N, stride of C); -1 = not constrained
            "cpu": (n * c, c, 1),
            "cpu_amx": (n * c, c, 1),
            "flash_nhd": (c, h * c, 1),
            "flash_hnd": (n * c, c, 1),
            "mla": (-1, c, 1),
        }
        for size, got, exp, axis in zip(
            (h, n, c),
            (s_h, s_n, s_c),
            want[self.kind],
            ("heads", "tokens", "content"),
            strict=True,
        ):
            # vLLM canonicalizes the strides of size-1 axes, so those are not checked.
            if size > 1 and exp != -1 and got != exp:
                raise LayoutError(
                    f"{self.kind} KV cache must be {_EXPECTED[self.kind]}; the {axis} axis has "
                    f"stride {got}, expected {exp} (strides {list(kv_cache.stride())})"
                )

    def cell_views(self, cache: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """Views ``(first kv, cells)`` of a cache ``[B, H, N, C]`` or layer-stacked caches
        ``[L, B, H, N, C]``; ``cells`` is ``[..., B, T1, T0, H, kv, D1, D0]``.

        Token ``slot`` of a block is ``(slot // T0, slot % T0)`` and dim ``d`` is
        ``(d // D0, d % D0)``: only the ``cpu_amx`` tiles need ``T1 > 1`` or ``D1 > 1``. K and V
        come as one view (kv axis of 2) where they share a cell (flash kinds), so one copy moves
        both; as two views otherwise (``cpu``: ``[(0, K), (1, V)]``). No copies: writing through
        the views writes the cache, which the caller has validated with :meth:`check_cache`.
        """
        lead = tuple(cache.shape[:-4])
        lead_strides = tuple(cache.stride()[:-4])
        b, h, n, c = cache.shape[-4:]
        s_b, s_h, s_n, _ = cache.stride()[-4:]
        d = self.head_dim
        base = cache.storage_offset()

        def cells(
            kv: int, t0: int, d0: int, strides: tuple[int, int, int, int, int, int], offset: int
        ) -> torch.Tensor:
            # strides: (T1, T0, kv, D1, D0) plus H, in the order below
            s_t1, s_t0, s_kv, s_d1, s_d0, s_hh = strides
            size = (*lead, b, n // t0, t0, h, kv, d // d0, d0)
            stride = (*lead_strides, s_b, s_t1, s_t0, s_hh, s_kv, s_d1, s_d0)
            return cache.as_strided(size, stride, base + offset)

        if self.kind == "mla":
            return [(0, cells(1, n, d, (n * s_n, s_n, c, d, 1, s_h), 0))]
        if self.kind in ("flash_nhd", "flash_hnd"):
            return [(0, cells(2, n, d, (n * s_n, s_n, d, d, 1, s_h), 0))]
        if self.kind == "cpu":
            # K region of a (block, head) is [D, N] (token fastest), V region [N, D].
            k = cells(1, n, d, (n, 1, 1, d * n, n, s_h), 0)
            v = cells(1, n, d, (n * d, d, 1, d, 1, s_h), n * d)
            return [(0, k), (1, v)]
        # cpu_amx: K region [N/16, D/2, 16, 2] (VNNI pairs of dims), V region [D/16, N/2, 16, 2]
        # (VNNI pairs of tokens); see the module docstring.
        k = cells(1, _AMX_K_TOKENS, 2, (_AMX_K_TOKENS * d, 2, 1, 2 * _AMX_K_TOKENS, 1, s_h), 0)
        v = cells(1, 2, _AMX_V_DIMS, (2 * _AMX_V_DIMS, 1, 1, _AMX_V_DIMS * n, 2, s_h), n * d)
        return [(0, k), (1, v)]


# AMX tile geometry of vLLM's CPU attention (cpu_attn_reshape_and_cache with isa="amx").
_AMX_K_TOKENS = 16
_AMX_V_DIMS = 16


def _as_4d(layout: KVLayout, kv_cache: torch.Tensor) -> torch.Tensor:
    if layout.kind == "mla" and kv_cache.dim() == 3:
        return kv_cache.unsqueeze(1)
    if kv_cache.dim() != 4:
        raise LayoutError(
            f"{layout.kind} KV cache must be {_EXPECTED[layout.kind]}, got shape "
            f"{list(kv_cache.shape)}"
        )
    return kv_cache


def stack_layers(kv_caches: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """``[L, *cache]`` view if the caches are equally spaced, same-strided windows of one
    storage (vLLM's layer-outermost group allocation), else None."""
    c0 = kv_caches[0]
    if len(kv_caches) == 1:
        return c0.unsqueeze(0)
    step = kv_caches[1].storage_offset() - c0.storage_offset()
    if step <= 0:
        return None
    ptr = c0.untyped_storage().data_ptr()
    for layer, cache in enumerate(kv_caches):
        if (
            cache.storage_offset() != c0.storage_offset() + layer * step
            or cache.stride() != c0.stride()
            or cache.untyped_storage().data_ptr() != ptr
        ):
            return None
    return c0.as_strided((len(kv_caches), *c0.shape), (step, *c0.stride()), c0.storage_offset())


LayerGroup = tuple[slice, list[tuple[int, torch.Tensor]]]


def layer_groups(layout: KVLayout, kv_caches: Sequence[torch.Tensor]) -> list[LayerGroup]:
    """What a kernel moves: ``[(layers, [(first kv, cells [L', B, N, H, kv, D]), ...]), ...]``.

    One group covering all layers when :func:`stack_layers` succeeds, else one group per layer.
    ``chunk[layers, first_kv : first_kv + kv]`` (moved to ``[L', tokens, H, kv, D]``) pairs with
    the cells. The caches have been validated.
    """
    stacked = stack_layers(kv_caches)
    if stacked is not None:
        groups = [(slice(0, len(kv_caches)), stacked)]
    else:
        groups = [(slice(i, i + 1), c.unsqueeze(0)) for i, c in enumerate(kv_caches)]
    # MLA caches may come squeezed ([B, N, C], MLAAttention.bind_kv_cache).
    return [
        (layers, layout.cell_views(c.unsqueeze(-3) if c.dim() == 4 else c)) for layers, c in groups
    ]


def chunk_view(
    page: torch.Tensor, layout: KVLayout, num_layers: int, num_tokens: int
) -> torch.Tensor:
    """View the first ``chunk_bytes`` of a uint8 pool ``page`` as a canonical chunk; no copy.

    ``page`` must be a contiguous uint8 tensor at least ``layout.chunk_bytes(...)`` long whose
    start is aligned to the dtype's item size. Writes into the result write the page.
    """
    if page.dtype != torch.uint8:
        raise ChunkError(f"pool page must be uint8, got {page.dtype}")
    if not page.is_contiguous():
        raise ChunkError("pool page must be contiguous")
    nbytes = layout.chunk_bytes(num_layers, num_tokens)
    flat = page.reshape(-1)
    if flat.numel() < nbytes:
        raise ChunkError(f"pool page holds {flat.numel()} bytes, the chunk needs {nbytes}")
    if flat.data_ptr() % layout.itemsize:
        raise ChunkError(f"pool page start is not aligned to {layout.itemsize} bytes")
    return flat[:nbytes].view(layout.dtype).view(layout.chunk_shape(num_layers, num_tokens))


def expand_block_ids(block_ids: torch.Tensor | Sequence[int], ratio: int) -> torch.Tensor:
    """Turn a manager-block table into a kernel-block table when vLLM splits each block in ``ratio``.

    Manager block ``m`` covers kernel blocks ``m*ratio .. m*ratio+ratio-1``; token ``t`` then sits
    in kernel block ``expanded[t // kernel_block_size]`` as :func:`gather` expects.
    """
    ids = torch.as_tensor(block_ids, dtype=torch.int64)
    if ratio == 1:
        return ids
    if ratio < 1:
        raise ChunkError(f"kernel block ratio must be >= 1, got {ratio}")
    offsets = torch.arange(ratio, dtype=ids.dtype, device=ids.device)
    return (ids.unsqueeze(1) * ratio + offsets).reshape(-1)
