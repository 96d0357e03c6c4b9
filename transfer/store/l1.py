"""L1: chunk pages in CPU RAM, one preallocated uint8 tensor, LRU over chunks, pin counts.

Not thread-safe by itself: :class:`~lmcache_disagg.transfer.store.store.ChunkStore` serialises
every call under its lock. A page moves FREE -> RESERVED (``reserve``; the caller fills it,
invisible to readers) -> COMMITTED (``commit``; visible, in the LRU) -> FREE (``abandon`` or
eviction). Only a committed chunk with zero pins can be evicted.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

import torch

__all__ = ["L1Cache", "L1Entry", "allocate_host_pages"]

logger = logging.getLogger(__name__)


def allocate_host_pages(
    n_pages: int, page_bytes: int, device: Literal["cpu", "pinned"]
) -> torch.Tensor:
    """``[n_pages, page_bytes]`` uint8, touched now so page faults stay off the data path.
    ``pinned`` is page-locked (falls back to pageable memory without CUDA)."""
    if device == "pinned" and torch.cuda.is_available():
        try:
            return torch.zeros((n_pages, page_bytes), dtype=torch.uint8, pin_memory=True)
        except RuntimeError as exc:
            logger.warning("pinned memory unavailable (%s); L1 uses pageable memory", exc)
    return torch.zeros((n_pages, page_bytes), dtype=torch.uint8)


@dataclass(slots=True)
class L1Entry:
    slot: int
    parent: bytes
    token_ids: tuple[int, ...]
    nbytes: int
    pins: int = 0


class L1Cache:
    """``capacity_bytes // page_bytes`` pages (at least 1)."""

    def __init__(
        self, capacity_bytes: int, page_bytes: int, device: Literal["cpu", "pinned"]
    ) -> None:
        n_pages = capacity_bytes // page_bytes
        if n_pages < 1:
            raise ValueError(f"L1 of {capacity_bytes} bytes holds no page of {page_bytes} bytes")
        self.page_bytes = page_bytes
        self.n_pages = n_pages
        self.pages = allocate_host_pages(n_pages, page_bytes, device)
        self._base = self.pages.data_ptr()
        self._free = list(range(n_pages - 1, -1, -1))
        self._reserved: set[int] = set()
        self._entries: OrderedDict[bytes, L1Entry] = OrderedDict()
        self._children: dict[bytes, set[bytes]] = {}
        self._pins = 0

    # -- pages -------------------------------------------------------------------------------
    def reserve(self) -> tuple[int | None, int]:
        """A free page (evicting the least recently used unpinned chunk if needed) and the
        number of chunks evicted; ``(None, n)`` when every page is reserved or pinned."""
        evicted = 0
        if not self._free:
            victim = next((k for k, e in self._entries.items() if e.pins == 0), None)
            if victim is None:
                return None, 0
            self._drop(victim)
            evicted = 1
        slot = self._free.pop()
        self._reserved.add(slot)
        return slot, evicted

    def page(self, slot: int) -> torch.Tensor:
        return self.pages[slot]

    def slot_of(self, page: torch.Tensor) -> int:
        """The reserved slot ``page`` (from :meth:`page`) views; ValueError otherwise."""
        offset = page.data_ptr() - self._base
        slot, rest = divmod(offset, self.page_bytes)
        if rest or not 0 <= slot < self.n_pages or slot not in self._reserved:
            raise ValueError("page is not a reserved L1 page")
        return slot

    def commit(
        self, slot: int, key: bytes, parent: bytes, token_ids: tuple[int, ...], nbytes: int
    ) -> bool:
        """Make a reserved page visible as ``key``. False (page freed) when ``key`` is already
        committed: the first copy wins."""
        self._reserved.discard(slot)
        if key in self._entries:
            self._free.append(slot)
            self._entries.move_to_end(key)
            return False
        self._entries[key] = L1Entry(slot, parent, token_ids, nbytes)
        self._children.setdefault(parent, set()).add(key)
        return True

    def abandon(self, slot: int) -> None:
        if slot in self._reserved:
            self._reserved.discard(slot)
            self._free.append(slot)

    # -- chunks ------------------------------------------------------------------------------
    def get(self, key: bytes, touch: bool = True) -> L1Entry | None:
        entry = self._entries.get(key)
        if entry is not None and touch:
            self._entries.move_to_end(key)
        return entry

    def children(self, parent: bytes) -> list[tuple[bytes, L1Entry]]:
        return [(k, self._entries[k]) for k in self._children.get(parent, ())]

    def pin(self, key: bytes) -> bool:
        entry = self._entries.get(key)
        if entry is None:
            return False
        entry.pins += 1
        self._pins += 1
        self._entries.move_to_end(key)
        return True

    def unpin(self, key: bytes) -> None:
        entry = self._entries.get(key)
        if entry is None or entry.pins <= 0:
            raise RuntimeError("unpin of a chunk that is not pinned")
        entry.pins -= 1
        self._pins -= 1

    def discard(self, key: bytes) -> bool:
        """Drop an unpinned chunk now (its page becomes free); False if absent or pinned."""
        entry = self._entries.get(key)
        if entry is None or entry.pins:
            return False
        self._drop(key)
        return True

    def _drop(self, key: bytes) -> None:
        entry = self._entries.pop(key)
        siblings = self._children.get(entry.parent)
        if siblings is not None:
            siblings.discard(key)
            if not siblings:
                del self._children[entry.parent]
        self._free.append(entry.slot)

    # -- accounting --------------------------------------------------------------------------
    @property
    def pinned(self) -> int:
        return self._pins

    @property
    def chunks(self) -> int:
        return len(self._entries)

    @property
    def reserved(self) -> int:
        return len(self._reserved)

    @property
    def used_bytes(self) -> int:
        return (len(self._entries) + len(self._reserved)) * self.page_bytes

    @property
    def capacity_bytes(self) -> int:
        return self.n_pages * self.page_bytes
