"""The chunk store facade: L1 in RAM, write-through to L2 (disk) and L3 (Redis), one lookup walk.

Threads: callers (the worker's forward thread, the scheduler) call any method; one named writer
thread drains the bounded write-through queue to L2 and hands L3 writes to the remote tier's
event-loop thread. Every L1 mutation happens under one lock; disk and network I/O never do.

A chunk queued for write-through holds one pin until the writer has copied it into a record,
so :meth:`ChunkStore.pinned_chunks` is 0 only once :meth:`ChunkStore.flush` returned True and
every lease was released (or expired).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from lmcache_disagg.transfer.protocol import LayoutFingerprint
from lmcache_disagg.transfer.store.disk import DiskTier
from lmcache_disagg.transfer.store.errors import CacheMiss, RecordError
from lmcache_disagg.transfer.store.format import (
    KEY_SIZE,
    Record,
    encode_record,
    fingerprint_digest,
    record_size,
    verify_record,
)
from lmcache_disagg.transfer.store.l1 import L1Cache
from lmcache_disagg.transfer.store.listener import TIER_NAMES, NullStoreListener, StoreListener
from lmcache_disagg.transfer.store.metrics import NullStoreMetrics, StoreMetrics
from lmcache_disagg.transfer.store.remote import RemoteTier
from lmcache_disagg.transfer.store.settings import StoreSettings
from lmcache_disagg.transfer.store.tier import Hit, HitChunk, Tier

__all__ = ["ChunkStore"]

logger = logging.getLogger(__name__)

_WRITER_POLL = 0.1
_STAGING_PAGES = 8


@dataclass(slots=True)
class _WriteJob:
    """A chunk to write to the lower tiers: either an L1 page (pinned by the job) or a record
    already in hand (an L3 hit promoted, written to L2)."""

    key: bytes
    parent: bytes
    token_ids: tuple[int, ...]
    nbytes: int
    to_disk: bool
    to_remote: bool
    record: bytes | None = None


@dataclass(slots=True)
class _Lease:
    chunks: list[HitChunk]
    expected: list[tuple[int, ...]]  # the query's token ids each chunk must start with
    deadline: float
    pinned: set[bytes] = field(default_factory=set)
    pages: dict[bytes, torch.Tensor] = field(default_factory=dict)  # only without L1


class ChunkStore:
    """Per worker (TP rank) and per layout. See STORE_API.md for the contract; in short::

    page = store.reserve_page(); page[:n].copy_(...); store.commit(page, key, parent, ids, n)
    hit = store.lookup(root, keys, ids, max_tokens, block_size, lease_id)
    pages = store.fetch(lease_id, timeout); ...; store.release(lease_id)
    """

    def __init__(
        self,
        settings: StoreSettings,
        fingerprint: LayoutFingerprint,
        metrics: StoreMetrics | None = None,
        listener: StoreListener | None = None,
    ) -> None:
        self.settings = settings
        self._listener: StoreListener = listener if listener is not None else NullStoreListener()
        self.fingerprint = fingerprint
        self._metrics: StoreMetrics = metrics if metrics is not None else NullStoreMetrics()
        self._digest = fingerprint_digest(fingerprint)
        self._chunk_size = fingerprint.chunk_size
        self._page_bytes = fingerprint.page_bytes
        self._bpt = self._page_bytes // self._chunk_size
        self._lock = threading.RLock()
        self._l1: L1Cache | None = None
        if settings.l1_enabled:
            if settings.max_local_cpu_size < self._page_bytes:
                logger.warning(
                    "max_local_cpu_size=%d holds no %d-byte chunk page; L1 is off",
                    settings.max_local_cpu_size,
                    self._page_bytes,
                )
            else:
                self._l1 = L1Cache(
                    settings.max_local_cpu_size, self._page_bytes, settings.l1_device
                )
        self._disk: DiskTier | None = None
        if settings.l2_enabled and settings.local_disk is not None:
            self._disk = DiskTier(
                settings.local_disk,
                settings.max_local_disk_size,
                self._digest,
                self._chunk_size,
                self._bpt,
                self._metrics,
                fsync=settings.local_disk_fsync == "always",
                scan_interval=settings.disk_scan_interval,
                listener=self._listener,  # L2 announces its own index changes
            )
        self._remote: RemoteTier | None = None
        if settings.l3_enabled and settings.remote_url:
            self._remote = RemoteTier(
                settings.remote_url,
                self._digest,
                self._chunk_size,
                self._metrics,
                cluster=settings.remote_cluster,
                timeout=settings.remote_timeout,
                max_connections=settings.remote_max_connections,
                ttl=settings.remote_ttl,
                record_bytes=record_size(self._chunk_size, self._page_bytes),
            )
        # Without L1, a few staging pages carry chunks to the lower tiers; they serve no lookup.
        self._staging: L1Cache | None = None
        if self._l1 is None and (self._disk is not None or self._remote is not None):
            staging = max(1, min(settings.write_queue, _STAGING_PAGES))
            self._staging = L1Cache(
                staging * self._page_bytes, self._page_bytes, settings.l1_device
            )
        self._pages: L1Cache | None = self._l1 if self._l1 is not None else self._staging
        self._staged = self._l1 is None  # pages are staging pages, freed once written
        self._leases: dict[Hashable, _Lease] = {}
        self._queue: queue.Queue[_WriteJob] = queue.Queue(maxsize=max(1, settings.write_queue))
        self._pending = 0  # jobs queued or being written
        self._idle = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._writer: threading.Thread | None = None
        self._started = False
        self._closed = False
        self._expiry_logged = False
        self._publish_l1()

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return self._l1 is not None or self._disk is not None or self._remote is not None

    def start(self) -> None:
        """Rebuild the L2 index from its files, start the writer thread and the L3 client."""
        with self._lock:
            if self._started:
                return
            self._started = True
        if self._disk is not None:
            self._disk.start()
        if self._remote is not None:
            self._remote.start()
        if self._disk is not None or self._remote is not None:
            self._writer = threading.Thread(
                target=self._write_loop, name="chunkstore-writer", daemon=True
            )
            self._writer.start()

    def close(self, timeout: float = 5.0) -> None:
        """Flush pending lower-tier writes within ``timeout``, stop the threads, drop every
        lease. Idempotent; writes still queued at the deadline are dropped (counted)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        deadline = time.monotonic() + timeout
        self.flush(timeout)
        self._stop.set()
        if self._writer is not None:
            self._writer.join(max(0.0, deadline - time.monotonic()))
        self._drain_queue()
        if self._remote is not None:
            self._remote.close(max(0.1, deadline - time.monotonic()))
        with self._lock:
            for lease_id in list(self._leases):
                self._release_locked(lease_id)

    def __enter__(self) -> ChunkStore:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- storing -----------------------------------------------------------------------------
    def reserve_page(self) -> torch.Tensor | None:
        """A uint8 page of ``page_bytes`` to gather one chunk into, or None (no tier on, or
        every page reserved or pinned). Give it back with :meth:`commit` or :meth:`abandon`.

        With L1 off but a lower tier on, the page is one of a few staging pages: the chunk is
        written through and the page freed once copied (None while all are in flight)."""
        pages = self._pages
        if pages is None:
            return None
        with self._lock:
            self._expire_locked()
            slot, evicted = pages.reserve()
            if evicted and not self._staged:
                self._metrics.count("evictions", Tier.L1, len(evicted))
                self._listener.evicted(evicted, "l1")
            self._publish_l1()
            return None if slot is None else pages.page(slot)

    def abandon(self, page: torch.Tensor) -> None:
        if self._pages is None:
            return
        with self._lock:
            try:
                self._pages.abandon(self._pages.slot_of(page))
            except ValueError:
                return
            self._publish_l1()

    def commit(
        self,
        page: torch.Tensor,
        key: bytes,
        parent: bytes,
        token_ids: Sequence[int],
        nbytes: int,
    ) -> bool:
        """Make a reserved page visible as chunk ``key`` (atomically: readers see all of it or
        nothing) and queue its write-through. False when ``key`` was already cached (the page
        is freed). Bad arguments free the page and raise ValueError."""
        pages = self._pages
        if pages is None:
            raise ValueError("commit without a page: reserve_page() returned None")
        ids = tuple(int(t) for t in token_ids)
        try:
            self._check_chunk(key, parent, ids, nbytes)
        except ValueError:
            self.abandon(page)
            raise
        with self._lock:
            slot = pages.slot_of(page)
            new = pages.commit(slot, key, parent, ids, nbytes)
            if new:
                if not self._staged:
                    self._metrics.count("written_bytes", Tier.L1, nbytes)
                    self._listener.stored([key], "l1")
                to_disk = self._disk is not None and not self._disk.contains(key)
                to_remote = self._remote is not None
                if (to_disk or to_remote) and self._started and not self._closed:
                    pages.pin(key)
                    if not self._enqueue_locked(
                        _WriteJob(key, parent, ids, nbytes, to_disk, to_remote)
                    ):
                        pages.unpin(key)
                if self._staged:
                    pages.discard(key)  # no-op while its write job holds the pin
            self._publish_l1()
            return new

    def contains(self, key: bytes, remote: bool = False) -> Tier | None:
        """The first tier holding ``key`` (no pin). L3 is asked only with ``remote=True``
        (one bounded round trip)."""
        with self._lock:
            if self._l1 is not None and self._l1.get(key, touch=False) is not None:
                return Tier.L1
        if self._disk is not None and self._disk.contains(key):
            return Tier.L2
        if remote and self._remote is not None and self._remote.exists_many([key])[0]:
            return Tier.L3
        return None

    # -- lookup ------------------------------------------------------------------------------
    def lookup(
        self,
        root: bytes,
        keys: Sequence[bytes],
        token_ids: Sequence[int],
        max_tokens: int,
        block_size: int,
        lease_id: Hashable,
        ttl: float | None = None,
    ) -> Hit:
        """The longest cached prefix of ``token_ids`` (see STORE_API.md), pinned under
        ``lease_id`` (replacing an earlier lease of that id) until :meth:`release` or ``ttl``
        (default ``cache_lease_ttl``)."""
        if block_size < 1:
            raise ValueError("block_size must be >= 1")
        ids = [int(t) for t in token_ids]
        cs = self._chunk_size
        n_chunks = min(len(keys), -(-len(ids) // cs))
        found: list[tuple[bytes, Tier, int]] = []
        child_stored: dict[bytes, int] = {}  # the partial-match child's own token count
        pinned: set[bytes] = set()
        walked = 0
        whole_end = True
        stop_at: int | None = None
        with self._lock:
            self._expire_locked()
            self._release_locked(lease_id)
            for i in range(n_chunks):
                if walked >= max_tokens:
                    break
                key = keys[i]
                n_i = min(cs, len(ids) - i * cs)
                if self._l1 is not None and (entry := self._l1.get(key)) is not None:
                    if len(entry.token_ids) != n_i:
                        stop_at = i
                        break
                    self._l1.pin(key)
                    pinned.add(key)
                    found.append((key, Tier.L1, n_i))
                elif self._disk is not None and self._disk.tokens_of(key) is not None:
                    found.append((key, Tier.L2, n_i))
                else:
                    stop_at = i
                    break
                walked += n_i
        if stop_at is not None and walked < max_tokens and self._remote is not None:
            first = stop_at
            exists = self._remote.exists_many(list(keys[first:n_chunks]))
            for offset, present in enumerate(exists):
                i = first + offset
                if not present or walked >= max_tokens:
                    break
                n_i = min(cs, len(ids) - i * cs)
                found.append((keys[i], Tier.L3, n_i))
                walked += n_i
                stop_at = i + 1 if i + 1 < n_chunks else None
        if stop_at is not None and walked < max_tokens:
            i = stop_at
            parent = keys[i - 1] if i else root
            best = self._best_child(parent, ids[i * cs : i * cs + cs], pinned)
            if best is not None:
                key, tier, common, child_tokens = best
                common -= common % block_size
                if common > 0:
                    with self._lock:
                        if tier is Tier.L1 and not self._pin_locked(key, pinned):
                            common = 0
                    if common > 0:
                        found.append((key, tier, common))
                        child_stored[key] = child_tokens
                        walked += common
                        whole_end = False
        hit = self._clip(found, max_tokens, block_size, whole_end, child_stored)
        with self._lock:
            kept = {c.key for c in hit.chunks}
            for key in list(pinned):
                if key not in kept and self._l1 is not None:
                    self._l1.unpin(key)
                    pinned.discard(key)
            self._count_lookup(hit, n_chunks)
            if hit.chunks:
                expected = [
                    tuple(ids[i * cs : i * cs + c.num_tokens]) for i, c in enumerate(hit.chunks)
                ]
                lease_ttl = self.settings.lease_ttl if ttl is None else ttl
                self._leases[lease_id] = _Lease(
                    hit.chunks, expected, time.monotonic() + lease_ttl, pinned
                )
            self._publish_l1()
        return hit

    def _pin_locked(self, key: bytes, pinned: set[bytes]) -> bool:
        if key in pinned:
            return True
        if self._l1 is None or not self._l1.pin(key):
            return False
        pinned.add(key)
        return True

    def _best_child(
        self, parent: bytes, wanted: list[int], pinned: set[bytes]
    ) -> tuple[bytes, Tier, int, int] | None:
        """The stored child of ``parent`` sharing the longest token prefix with ``wanted``."""
        candidates: list[tuple[bytes, Tier, tuple[int, ...]]] = []
        with self._lock:
            if self._l1 is not None:
                candidates += [(k, Tier.L1, e.token_ids) for k, e in self._l1.children(parent)]
        if self._disk is not None:
            candidates += [(k, Tier.L2, t) for k, t in self._disk.children(parent)]
        if not any(_common_prefix(t, wanted) > 0 for _, _, t in candidates) and self._remote:
            candidates += [(k, Tier.L3, t) for k, t in self._remote.children(parent)]
        best: tuple[bytes, Tier, int, int] | None = None
        for key, tier, tokens in candidates:
            common = _common_prefix(tokens, wanted)
            if common > 0 and (best is None or common > best[2]):
                best = (key, tier, common, len(tokens))
        return best

    def _clip(
        self,
        found: list[tuple[bytes, Tier, int]],
        max_tokens: int,
        block: int,
        whole_end: bool,
        stored: dict[bytes, int] | None = None,
    ) -> Hit:
        total = sum(n for _, _, n in found)
        final = min(total, max_tokens)
        if final % block and not (final == max_tokens and final == total and whole_end):
            final -= final % block
        chunks: list[HitChunk] = []
        left = final
        for key, tier, n in found:
            if left <= 0:
                break
            take = min(n, left)
            chunks.append(HitChunk(key, tier, take, (stored or {}).get(key, n)))
            left -= take
        return Hit(final, chunks)

    def _count_lookup(self, hit: Hit, n_chunks: int) -> None:
        tiers = [t for t, on in self._tiers_on() if on]
        for chunk in hit.chunks:
            self._metrics.count("hits", chunk.tier)
            self._metrics.count("hit_tokens", chunk.tier, chunk.num_tokens)
            for tier in tiers:
                if tier is chunk.tier:
                    break
                self._metrics.count("misses", tier)
        if len(hit.chunks) < n_chunks:
            for tier in tiers:
                self._metrics.count("misses", tier)

    # -- fetch / release ---------------------------------------------------------------------
    def fetch(self, lease_id: Hashable, timeout: float) -> list[torch.Tensor]:
        """The L1 pages of a lease's chunks, in order, promoting L2/L3 chunks into L1.

        Raises CacheMiss(i, reason) when chunk ``i`` cannot be served; chunks before it are
        valid (and stay pinned until :meth:`release`)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            self._expire_locked()
            lease = self._leases.get(lease_id)
            if lease is None:
                raise CacheMiss(0, "lease_unknown", f"no live lease {lease_id!r}")
            chunks = list(lease.chunks)
        pages: list[torch.Tensor] = []
        for i, chunk in enumerate(chunks):
            page = self._page_if_cached(lease_id, i, chunk.key)
            if page is None:
                if time.monotonic() >= deadline:
                    raise CacheMiss(i, "timeout", f"fetch passed its {timeout}s deadline")
                page = self._promote(lease_id, i, chunk, lease.expected[i], deadline)
            pages.append(page)
        return pages

    def _page_if_cached(self, lease_id: Hashable, index: int, key: bytes) -> torch.Tensor | None:
        with self._lock:
            lease = self._leases.get(lease_id)
            if lease is None:
                raise CacheMiss(index, "lease_expired", f"lease {lease_id!r} expired during fetch")
            if key in lease.pages:
                return lease.pages[key]
            if self._l1 is None:
                return None
            if key not in lease.pinned:
                if not self._l1.pin(key):
                    return None
                lease.pinned.add(key)
            entry = self._l1.get(key)
            assert entry is not None
            return self._l1.page(entry.slot)

    def _promote(
        self,
        lease_id: Hashable,
        index: int,
        chunk: HitChunk,
        expected: tuple[int, ...],
        deadline: float,
    ) -> torch.Tensor:
        started = time.monotonic()
        record, tier = self._read_lower(index, chunk, deadline)
        header = record.header
        if record.token_ids[: len(expected)] != expected:
            self._metrics.count("faults", tier, reason="mismatch")
            raise CacheMiss(index, "mismatch", "stored token ids differ from the prompt")
        self._metrics.count("read_bytes", tier, header.payload_len)
        payload = np.frombuffer(record.payload, dtype=np.uint8)
        if self._l1 is None:
            page = torch.zeros(self._page_bytes, dtype=torch.uint8)
            page[: header.payload_len].numpy()[:] = payload
            with self._lock:
                lease = self._leases.get(lease_id)
                if lease is None:
                    raise CacheMiss(index, "lease_expired")
                lease.pages[chunk.key] = page
            self._metrics.observe("load_seconds", tier, time.monotonic() - started)
            return page
        with self._lock:
            slot, evicted = self._l1.reserve()
            if evicted:
                self._metrics.count("evictions", Tier.L1, len(evicted))
                self._listener.evicted(evicted, "l1")
        if slot is None:
            self._metrics.count("faults", Tier.L1, reason="no_room")
            raise CacheMiss(index, "no_room", "every L1 page is pinned")
        try:  # the reserved page is invisible to readers until commit
            self._l1.page(slot)[: header.payload_len].numpy()[:] = payload
        except BaseException:
            with self._lock:
                self._l1.abandon(slot)
            raise
        with self._lock:
            lease = self._leases.get(lease_id)
            self._l1.commit(slot, chunk.key, header.parent, record.token_ids, header.payload_len)
            self._metrics.count("promotions", tier)
            self._listener.promoted([chunk.key], "l1", TIER_NAMES[tier])
            self._metrics.count("written_bytes", Tier.L1, header.payload_len)
            if tier is Tier.L3 and self._disk is not None and not self._disk.contains(chunk.key):
                self._enqueue_locked(
                    _WriteJob(
                        chunk.key,
                        header.parent,
                        record.token_ids,
                        header.payload_len,
                        to_disk=True,
                        to_remote=False,
                        record=record.raw,
                    )
                )
            self._publish_l1()
            if lease is None:
                raise CacheMiss(index, "lease_expired")
            if not self._pin_locked(chunk.key, lease.pinned):
                raise CacheMiss(index, "no_room")
            entry = self._l1.get(chunk.key)
            assert entry is not None
            result = self._l1.page(entry.slot)
        self._metrics.observe("load_seconds", tier, time.monotonic() - started)
        return result

    def _read_lower(self, index: int, chunk: HitChunk, deadline: float) -> tuple[Record, Tier]:
        """The verified record of a chunk from L2, else L3; CacheMiss when neither serves it.
        A bad L2 file was deleted and counted by the disk tier; a bad L3 value is counted here."""
        reason = "missing"
        if self._disk is not None:
            try:
                return self._disk.load(chunk.key), Tier.L2
            except RecordError as exc:
                reason = exc.reason
        if self._remote is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CacheMiss(index, "timeout")
            value, why = self._remote.get(chunk.key, remaining)
            if value is None:
                raise CacheMiss(index, why, f"chunk {index} is not in L3 ({why})")
            try:
                record = verify_record(
                    value, self._digest, self._chunk_size, self._bpt, key=chunk.key
                )
            except RecordError as exc:
                why = "bad_size" if exc.reason == "truncated" else exc.reason
                self._metrics.count("faults", Tier.L3, reason=why)
                self._remote.log_fault(why, str(exc))
                raise CacheMiss(index, why, str(exc)) from exc
            return record, Tier.L3
        raise CacheMiss(index, reason, f"chunk {index} is in no lower tier any more ({reason})")

    def release(self, lease_id: Hashable) -> None:
        """Unpin a lease's chunks. Idempotent; safe after expiry."""
        with self._lock:
            self._release_locked(lease_id)
            self._publish_l1()

    def _release_locked(self, lease_id: Hashable) -> None:
        lease = self._leases.pop(lease_id, None)
        if lease is None or self._l1 is None:
            return
        for key in lease.pinned:
            self._l1.unpin(key)
        lease.pinned.clear()

    def _expire_locked(self) -> None:
        if not self._leases:
            return
        now = time.monotonic()
        for lease_id in [k for k, v in self._leases.items() if v.deadline <= now]:
            self._release_locked(lease_id)
            self._metrics.count("faults", Tier.L1, reason="lease_expired")
            log = logger.debug if self._expiry_logged else logger.warning
            self._expiry_logged = True
            log("chunk-store lease %r expired unreleased; its pins were dropped", lease_id)

    # -- accounting --------------------------------------------------------------------------
    def pinned_chunks(self) -> int:
        """Pins held on pages (leases, and chunks queued for write-through)."""
        with self._lock:
            self._expire_locked()
            return 0 if self._pages is None else self._pages.pinned

    def reserved_pages(self) -> int:
        """Pages reserved and neither committed nor abandoned."""
        with self._lock:
            return 0 if self._pages is None else self._pages.reserved

    def leases(self) -> int:
        with self._lock:
            self._expire_locked()
            return len(self._leases)

    def usage(self) -> dict[Tier, tuple[int, int]]:
        out: dict[Tier, tuple[int, int]] = {}
        with self._lock:
            if self._l1 is not None:
                out[Tier.L1] = (self._l1.used_bytes, self._l1.capacity_bytes)
        if self._disk is not None:
            out[Tier.L2] = (self._disk.used_bytes, self._disk.capacity_bytes)
        if self._remote is not None:
            out[Tier.L3] = (0, 0)
        return out

    def chunks(self, tier: Tier) -> int:
        """Chunks this store indexes in ``tier`` (L3: 0, not tracked)."""
        if tier is Tier.L1:
            with self._lock:
                return 0 if self._l1 is None else self._l1.chunks
        if tier is Tier.L2:
            return 0 if self._disk is None else self._disk.chunks
        return 0

    def _tiers_on(self) -> list[tuple[Tier, bool]]:
        return [
            (Tier.L1, self._l1 is not None),
            (Tier.L2, self._disk is not None),
            (Tier.L3, self._remote is not None),
        ]

    def _publish_l1(self) -> None:
        if self._l1 is None:
            return
        self._metrics.gauge("used_bytes", Tier.L1, self._l1.used_bytes)
        self._metrics.gauge("capacity_bytes", Tier.L1, self._l1.capacity_bytes)
        self._metrics.gauge("chunks", Tier.L1, self._l1.chunks)
        self._metrics.gauge("pinned_chunks", Tier.L1, self._l1.pinned)

    def _check_chunk(self, key: bytes, parent: bytes, ids: tuple[int, ...], nbytes: int) -> None:
        if len(key) != KEY_SIZE or len(parent) != KEY_SIZE:
            raise ValueError("key and parent must be 16 bytes")
        if not 1 <= len(ids) <= self._chunk_size:
            raise ValueError(f"a chunk holds 1..{self._chunk_size} tokens, got {len(ids)}")
        if any(not 0 <= t < 1 << 32 for t in ids):
            raise ValueError("token ids must be in [0, 2**32)")
        if nbytes != len(ids) * self._bpt:
            raise ValueError(f"{len(ids)} tokens are {len(ids) * self._bpt} bytes, got {nbytes}")

    # -- write-through -----------------------------------------------------------------------
    def _enqueue_locked(self, job: _WriteJob) -> bool:
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            for tier, on in ((Tier.L2, job.to_disk), (Tier.L3, job.to_remote)):
                if on:
                    self._metrics.count("faults", tier, reason="queue_full")
            return False
        self._pending += 1
        return True

    def flush(self, timeout: float) -> bool:
        """Wait until every queued lower-tier write is done (L3 writes acknowledged)."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._pending:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self._writer is None or not self._writer.is_alive()):
                    return False
                self._idle.wait(remaining)
        if self._remote is not None:
            return self._remote.flush(max(0.0, deadline - time.monotonic()))
        return True

    def _drain_queue(self) -> None:
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            with self._lock:
                self._finish_job_locked(job, copied=False)
                for tier, on in ((Tier.L2, job.to_disk), (Tier.L3, job.to_remote)):
                    if on:
                        self._metrics.count("faults", tier, reason="shutdown")

    def _finish_job_locked(self, job: _WriteJob, copied: bool) -> None:
        if job.record is None and not copied:
            self._unpin_job_locked(job)
        self._pending -= 1
        self._idle.notify_all()
        self._publish_l1()

    def _unpin_job_locked(self, job: _WriteJob) -> None:
        """Drop a write job's pin on its page (a staging page is freed with it)."""
        if self._pages is None:
            return
        self._pages.unpin(job.key)
        if self._staged:
            self._pages.discard(job.key)

    def _write_loop(self) -> None:
        while not self._stop.is_set():
            try:
                job = self._queue.get(timeout=_WRITER_POLL)
            except queue.Empty:
                continue
            try:
                self._write_one(job)
            except Exception:  # the writer must survive anything; the chunk stays in L1
                logger.exception("chunk-store writer failed on one chunk")
                with self._lock:
                    if job.record is None:
                        self._unpin_job_locked(job)
                    self._pending -= 1
                    self._idle.notify_all()

    def _write_one(self, job: _WriteJob) -> None:
        record = job.record
        if record is None:
            pages = self._pages
            assert pages is not None
            with self._lock:
                entry = pages.get(job.key, touch=False)
                assert entry is not None  # pinned by the job
                page = pages.page(entry.slot)
            try:  # the job's pin keeps the page stable while it is copied, outside the lock
                record = encode_record(
                    self._digest,
                    job.key,
                    job.parent,
                    job.token_ids,
                    page[: job.nbytes].numpy().data,
                )
            finally:
                with self._lock:
                    self._unpin_job_locked(job)
                    job.record = b""  # the pin is gone: error paths must not unpin again
                    self._publish_l1()
        if job.to_disk and self._disk is not None:
            self._disk.write(job.key, job.parent, job.token_ids, record)  # announces "stored"
        # L3: submitted, not yet acknowledged; a failed write leaves the index stale (slower only).
        if (
            job.to_remote
            and self._remote is not None
            and self._remote.put(job.key, job.parent, record)
        ):
            self._listener.stored([job.key], "l3")
        with self._lock:
            self._pending -= 1
            self._idle.notify_all()


def _common_prefix(stored: Sequence[int], wanted: Sequence[int]) -> int:
    n = min(len(stored), len(wanted))
    for i in range(n):
        if stored[i] != wanted[i]:
            return i
    return n
