"""Exceptions raised by :mod:`lmcache_disagg.transfer.store` (torch-free).

A store failure never means wrong KV: the caller recomputes what the store could not serve::

    LMCacheDisaggError
    └── StoreError
        ├── CacheMiss        fetch() could not read chunk ``index`` (``reason`` says why)
        └── RecordError      an on-disk / remote record is malformed (``reason`` is a fault label)
"""

from __future__ import annotations

from lmcache_disagg.errors import LMCacheDisaggError

__all__ = ["CacheMiss", "RecordError", "StoreError"]


class StoreError(LMCacheDisaggError):
    """Base of every chunk-store failure. ``reason`` is a short metric label."""

    reason = "error"


class CacheMiss(StoreError):
    """Chunk ``index`` of a lease could not be served; chunks before it are valid."""

    def __init__(self, index: int, reason: str, message: str | None = None) -> None:
        super().__init__(message or f"chunk {index} of the hit could not be read: {reason}")
        self.index = index
        self.reason = reason


class RecordError(StoreError):
    """A stored record failed validation; ``reason`` is one of the fault labels
    (``truncated``, ``checksum``, ``foreign``, ``bad_size``)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
