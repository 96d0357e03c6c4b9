"""Gather vLLM paged KV blocks into canonical chunks and scatter chunks back.

Imports only torch (Triton lazily, for GPU tensors). See :mod:`.layouts` for which vLLM 0.32
layout each :class:`KVLayout` kind mirrors.
"""

from lmcache_disagg.kernels.errors import ChunkError, KernelError, LayoutError
from lmcache_disagg.kernels.layouts import KVLayout, LayoutKind, chunk_view, expand_block_ids
from lmcache_disagg.kernels.ops import gather, scatter

__all__ = [
    "ChunkError",
    "KVLayout",
    "KernelError",
    "LayoutError",
    "LayoutKind",
    "chunk_view",
    "expand_block_ids",
    "gather",
    "scatter",
]
