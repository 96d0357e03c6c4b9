"""D side of PD with reuse: which leading chunks of a push D's own chunk store already holds.

The receiver asks :meth:`StoreHeld.held` at each reservation (its control thread): the leading run
of P's chunk keys that are in D's RAM tier (L1) is pinned under a lease named by the transfer
(``rx:<transfer id>``), so those chunks cannot be evicted before the loader reads them, and P does
not push them. Only L1 counts: the loader reads held chunks on the engine thread, which must never
wait on disk or Redis. The lease ends when the receiver ends the reservation (the loader released
it, P cancelled, or its TTL passed) or, as a backstop, after the lease's own TTL.

The loader verifies each held chunk's key against the keys of D's own prompt exactly as it does a
pushed one; the store verifies that the page it returns is the chunk of that key.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from lmcache_disagg.transfer.store import Hit, Tier

__all__ = ["StoreHeld", "lease_of"]


class _Store(Protocol):
    def lookup(
        self,
        root: bytes,
        keys: Sequence[bytes],
        token_ids: Sequence[int],
        max_tokens: int,
        block_size: int,
        lease_id: str,
        ttl: float | None = None,
    ) -> Hit: ...

    def contains(self, key: bytes) -> Tier | None: ...

    def fetch(self, lease_id: str, timeout: float) -> list[torch.Tensor]: ...

    def release(self, lease_id: str) -> None: ...


def lease_of(transfer_id: str) -> str:
    """The store lease holding a transfer's held chunks (apart from the scheduler's leases)."""
    return "rx:" + transfer_id


class StoreHeld:
    """The receiver's :class:`~lmcache_disagg.transfer.receiver.HeldChunks` over a ChunkStore."""

    def __init__(self, store: _Store, root: bytes, chunk_size: int) -> None:
        self._store = store
        self._root = root
        self._chunk = chunk_size

    def held(self, transfer_id: str, keys: Sequence[bytes], ttl: float) -> int:
        """How many leading ``keys`` (all full chunks) are in L1; those stay pinned."""
        n = 0
        while n < len(keys) and self._store.contains(keys[n]) is Tier.L1:
            n += 1
        if n == 0:
            return 0
        lease = lease_of(transfer_id)
        n_tokens = n * self._chunk
        # Every chunk walked is a whole-key L1 hit (the token ids only matter for a partial
        # match past the last whole hit, which max_tokens rules out: placeholders suffice).
        hit = self._store.lookup(
            self._root, keys[:n], [0] * n_tokens, n_tokens, self._chunk, lease, ttl
        )
        held = 0
        for index, chunk in enumerate(hit.chunks):
            if (
                index >= n
                or chunk.key != keys[index]
                or chunk.tier is not Tier.L1
                or chunk.num_tokens != self._chunk
            ):
                break
            held += 1
        if held != len(hit.chunks) or held == 0:
            # Evicted in between (rare): push everything rather than fetch from a lower tier.
            self._store.release(lease)
            return 0
        return held

    def pages(self, transfer_id: str, n: int) -> list[torch.Tensor]:
        """The first ``n`` held chunks' store pages (raises CacheMiss or TransferError)."""
        pages = self._store.fetch(lease_of(transfer_id), 1.0)
        if len(pages) < n:
            raise ValueError(f"{len(pages)} held chunk pages, expected {n}")
        return pages[:n]

    def drop(self, transfer_id: str) -> None:
        self._store.release(lease_of(transfer_id))
