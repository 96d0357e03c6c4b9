"""Chunk keys, re-exported from :mod:`lmcache_disagg.keys` (torch-free, shared with the proxy)."""

from lmcache_disagg.keys import KEY_BYTES, KEY_SCHEME, chain_root, chunk_keys, chunk_spans

__all__ = ["KEY_BYTES", "KEY_SCHEME", "chain_root", "chunk_keys", "chunk_spans"]
