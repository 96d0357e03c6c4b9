"""Errors raised by :mod:`lmcache_disagg.kernels`.

::

    LMCacheDisaggError
    └── KernelError                  any misuse of gather/scatter
        ├── LayoutError (ValueError)   a KV cache tensor does not match the layout kind
        └── ChunkError (ValueError)    chunk tensor, token range or block table is inconsistent

Both are programming or configuration errors (wrong layout kind for the attention backend, a
block table too short for the token range): callers should treat them as "recompute", not retry.
"""

from __future__ import annotations

from lmcache_disagg.errors import LMCacheDisaggError

__all__ = ["ChunkError", "KernelError", "LayoutError"]


class KernelError(LMCacheDisaggError):
    """Root of the kernels subpackage's errors."""


class LayoutError(KernelError, ValueError):
    """A KV cache tensor's shape, strides or dtype do not match the requested layout kind."""


class ChunkError(KernelError, ValueError):
    """The chunk tensor, the token range or the block ids do not fit the layout or the caches."""
