"""Page-granular buffers: D's :class:`ReceivePool` and P's :class:`SendPool` (staging pages).

Both are one contiguous torch ``uint8`` tensor ``[n_pages, page_bytes]`` allocated once, so NIXL
registers each exactly once and the TCP path can ``recv_into``/``sendmsg`` straight from a
memoryview of it. All methods are thread-safe (one lock, held for O(pages) bookkeeping only).
"""

from __future__ import annotations

import ctypes
import logging
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch

from lmcache_disagg.transfer.errors import DeadlineExceeded, NoRoom

__all__ = ["PageAllocator", "ReceivePool", "SendPage", "SendPool", "allocate_pages", "host_view"]

logger = logging.getLogger(__name__)


def allocate_pages(n_pages: int, page_bytes: int, device: str) -> torch.Tensor:
    """``device`` is "cpu", "pinned" (page-locked host; falls back to cpu without CUDA) or "cuda"."""
    if n_pages <= 0 or page_bytes <= 0:
        raise ValueError(f"pool needs >= 1 page of >= 1 byte, got {n_pages} x {page_bytes}")
    if device == "cuda":
        return torch.zeros((n_pages, page_bytes), dtype=torch.uint8, device="cuda")
    if device == "pinned":
        try:
            return torch.zeros((n_pages, page_bytes), dtype=torch.uint8, pin_memory=True)
        except RuntimeError as exc:
            logger.warning("pinned memory unavailable (%s); using pageable host memory", exc)
    pages = torch.empty((n_pages, page_bytes), dtype=torch.uint8)
    _advise_huge_pages(pages)
    # Touch every page now (zero_) so first-write page faults stay off the data path.
    return pages.zero_()


_MADV_HUGEPAGE = 14
_HUGE_PAGE = 2 << 20


def _advise_huge_pages(pages: torch.Tensor) -> None:
    """Ask for transparent huge pages on a large host pool (best effort, Linux only).

    The pools are long-lived and every chunk copy streams through them; with 4 KiB pages a
    256 MiB pool costs a TLB miss every 4 KiB of every memcpy in and out of it.
    """
    nbytes = pages.numel()
    if nbytes < 4 * _HUGE_PAGE or not sys.platform.startswith("linux"):
        return
    start = (pages.data_ptr() + _HUGE_PAGE - 1) & ~(_HUGE_PAGE - 1)
    end = (pages.data_ptr() + nbytes) & ~(_HUGE_PAGE - 1)
    if end <= start:
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_HUGEPAGE)
    except (OSError, AttributeError) as exc:
        logger.debug("madvise(MADV_HUGEPAGE) unavailable: %s", exc)


def host_view(pages: torch.Tensor) -> memoryview | None:
    """A flat writable memoryview over a host tensor (None for device memory)."""
    if pages.device.type != "cpu":
        return None
    return memoryview(pages.numpy()).cast("B")  # type: ignore[arg-type]


class PageAllocator:
    """A free list of page indices ``[0, n_pages)``: all-or-nothing :meth:`acquire`, :meth:`release`.

    Knows nothing about transfers or TTLs (the owners of the indices do). Thread-safe. LIFO, so
    recently used (cache-warm) pages stay in play.
    """

    def __init__(self, n_pages: int) -> None:
        self.n_pages = n_pages
        self._lock = threading.Lock()
        self._free = list(range(n_pages - 1, -1, -1))

    def acquire(self, n_pages: int) -> list[int]:
        """``n_pages`` free page indices; raises NoRoom when fewer are free."""
        if n_pages <= 0 or n_pages > self.n_pages:
            raise NoRoom(f"cannot reserve {n_pages} pages in a pool of {self.n_pages}")
        with self._lock:
            if len(self._free) < n_pages:
                raise NoRoom(
                    f"receive pool full: {n_pages} pages wanted, {len(self._free)} of "
                    f"{self.n_pages} free"
                )
            return [self._free.pop() for _ in range(n_pages)]

    def release(self, pages: list[int]) -> None:
        """Give back pages from :meth:`acquire` (each exactly once)."""
        with self._lock:
            self._free.extend(reversed(pages))

    def in_use(self) -> int:
        with self._lock:
            return self.n_pages - len(self._free)


class ReceivePool:
    """D's receive pool: the page tensor and its :class:`PageAllocator`.

    Reservations (:mod:`.reservation`) own the indices they acquired, their TTL and slot states;
    the pool only hands pages out and takes them back.
    """

    def __init__(self, n_pages: int, page_bytes: int, device: str = "cpu") -> None:
        self.pages = allocate_pages(n_pages, page_bytes, device)
        self.n_pages = n_pages
        self.page_bytes = page_bytes
        self.view = host_view(self.pages)
        self._alloc = PageAllocator(n_pages)

    def acquire(self, n_pages: int) -> list[int]:
        """Raises NoRoom."""
        return self._alloc.acquire(n_pages)

    def release(self, pages: list[int]) -> None:
        self._alloc.release(pages)

    def occupancy(self) -> int:
        """Pages in use."""
        return self._alloc.in_use()


@dataclass(eq=False)
class SendPage:
    """One staging page of P. ``data`` is a ``uint8 [page_bytes]`` view; fill ``data[:nbytes]``."""

    index: int
    data: torch.Tensor


class SendPool:
    """P's staging pages. ``acquire`` blocks (with a deadline) until a page frees up."""

    def __init__(self, n_pages: int, page_bytes: int, device: str = "cpu") -> None:
        self.pages = allocate_pages(n_pages, page_bytes, device)
        self.n_pages = n_pages
        self.page_bytes = page_bytes
        self.view = host_view(self.pages)
        self._pages = [SendPage(i, self.pages[i]) for i in range(n_pages)]
        self.by_index: Mapping[int, SendPage] = MappingProxyType(dict(enumerate(self._pages)))
        """Every page by its index (to check a page comes from this pool)."""
        self._free = list(range(n_pages))
        self._cond = threading.Condition()

    def acquire(self, timeout: float) -> SendPage:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._free:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise DeadlineExceeded(
                        f"no staging page freed up within {timeout:.3g}s "
                        f"({self.n_pages} pages of {self.page_bytes} bytes all in flight)"
                    )
                self._cond.wait(remaining)
            return self._pages[self._free.pop()]

    def release(self, page: SendPage) -> None:
        with self._cond:
            if page.index in self._free:
                return
            self._free.append(page.index)
            self._cond.notify()

    def release_many(self, pages: list[SendPage]) -> int:
        """Return several pages at once; returns the pages still in use."""
        with self._cond:
            free = set(self._free)
            for page in pages:
                if page.index not in free:
                    free.add(page.index)
                    self._free.append(page.index)
            self._cond.notify(len(pages))
            return self.n_pages - len(self._free)

    def in_use(self) -> int:
        with self._cond:
            return self.n_pages - len(self._free)
