"""The worker's chunk store, wired into the connector: lookups, loads and storing, per TP rank.

:class:`WorkerCache` owns this rank's :class:`~lmcache_disagg.transfer.store.ChunkStore`, the
:class:`~lmcache_disagg.connector.lookup.LookupServer` thread that answers the scheduler's lookups
(pinning each hit under its lease), the :class:`CacheLoader` and the :class:`CacheSaver`. It
works the same in every role: ``kv_both`` without a proxy, P (loads its cached prefix, then
pushes the whole prompt to D as before) and D (stores what it received once it is in the paged
cache).

Leases: a lookup pins its hit under ``lease_id``; the lease is released when the load finished or
failed, when the scheduler tells the workers the lookup will not be used (``cache_releases``), or
at the latest after ``cache_lease_ttl`` (the store's backstop).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING

from lmcache_disagg.config import LMCacheDisaggConfig
from lmcache_disagg.connector.cache_load import CacheLoader, HitSpan, LeasedHit
from lmcache_disagg.connector.cache_metrics import StoreStatsAdapter
from lmcache_disagg.connector.cache_save import CacheSaver
from lmcache_disagg.connector.device import CopyEngine
from lmcache_disagg.connector.keys import chain_root, chunk_keys
from lmcache_disagg.connector.kvcache import WorkerKV
from lmcache_disagg.connector.logonce import LogOnce
from lmcache_disagg.connector.lookup import LookupAnswer
from lmcache_disagg.connector.metadata import LMCacheDisaggMetadata
from lmcache_disagg.connector.protocol import LookupRequest
from lmcache_disagg.connector.stats import StatsRecorder

if TYPE_CHECKING:
    from lmcache_disagg.transfer.event_publisher import KVEventPublisher

__all__ = ["MAX_OPEN_LEASES", "WorkerCache", "cache_enabled", "events_endpoint", "fetch_timeout"]

logger = logging.getLogger(__name__)

MAX_OPEN_LEASES = 4096
"""Lookup results kept for loads not yet dispatched; the oldest beyond it is released."""
LOCAL_FETCH_TIMEOUT = 5.0
"""Seconds a fetch from RAM or disk may take before the load is recomputed."""


def cache_enabled(config: LMCacheDisaggConfig) -> bool:
    """Any tier of the chunk store configured."""
    return bool(
        (config.local_cpu and config.max_local_cpu_size > 0)
        or (config.local_disk and config.max_local_disk_size > 0)
        or config.remote_url
    )


def fetch_timeout(config: LMCacheDisaggConfig) -> float:
    """A fetch reads at most one lower tier per chunk; each remote read has its own timeout."""
    return LOCAL_FETCH_TIMEOUT + (config.remote_timeout * 4 if config.remote_url else 0.0)


class WorkerCache:
    """One rank's store and the connector paths around it. Engine-thread API, except
    :meth:`answer`, which the lookup thread calls."""

    def __init__(
        self,
        config: LMCacheDisaggConfig,
        kv: WorkerKV,
        copy_engine: CopyEngine,
        stats: StatsRecorder,
        log: LogOnce,
    ) -> None:
        from lmcache_disagg.transfer.store import ChunkStore, StoreSettings

        self.config = config
        self.kv = kv
        self.stats = stats
        self.events = _events_publisher(config, kv)
        self.store = ChunkStore(
            StoreSettings.from_config(config),
            kv.fingerprint,
            metrics=StoreStatsAdapter(stats),
            listener=self.events,
        )
        self._root = chain_root(kv.fingerprint)
        self._lock = threading.Lock()
        self._hits: OrderedDict[str, LeasedHit] = OrderedDict()
        self.loader = CacheLoader(
            self.store,
            kv,
            copy_engine,
            stats,
            log,
            take_hit=self._take_hit,
            fetch_timeout=fetch_timeout(config),
        )
        self.saver = CacheSaver(
            self.store, kv, copy_engine, stats, log, save_unfull_chunk=config.save_unfull_chunk
        )

    def start(self) -> None:
        if self.events is not None:
            self.events.start()
            logger.info(
                "lmcache-disagg rank %d: KV events on %s (snapshots on %s)",
                self.kv.fingerprint.tp_rank, self.events.endpoint, self.events.snapshot_endpoint,
            )  # fmt: skip
        self.store.start()

    # -- lookup thread ---------------------------------------------------------------------------

    def answer(self, request: LookupRequest) -> LookupAnswer:
        """Find and pin the longest cached prefix of ``request.token_ids`` (lookup thread)."""
        chunk = self.kv.fingerprint.chunk_size
        tokens = request.token_ids
        keys = chunk_keys(self._root, tokens, chunk)
        # Ask for the whole prompt: a whole-key hit through its last token is then not rounded
        # to a block, and the scheduler uses all of it but the last token.
        hit = self.store.lookup(
            self._root,
            keys,
            tokens,
            len(tokens),
            request.block_size,
            request.lease_id,
            self.config.cache_lease_ttl,
        )
        if hit.num_tokens <= 0 or not hit.chunks:
            self.store.release(request.lease_id)
            return LookupAnswer(0)
        spans: list[HitSpan] = []
        for index, hit_chunk in enumerate(hit.chunks):
            stored = hit_chunk.stored_tokens
            if not stored:
                whole = index < len(keys) and hit_chunk.key == keys[index]
                stored = min(chunk, len(tokens) - index * chunk) if whole else 0
            if stored < hit_chunk.num_tokens:
                break  # a chunk whose stored length is unknown ends the usable hit here
            spans.append(HitSpan(hit_chunk.num_tokens, stored))
        usable = sum(span.num_tokens for span in spans)
        if usable <= 0:
            self.store.release(request.lease_id)
            return LookupAnswer(0)
        leased = LeasedHit(request.lease_id, usable, spans)
        with self._lock:
            self._hits[request.lease_id] = leased
            self._hits.move_to_end(request.lease_id)
            dropped = []
            while len(self._hits) > MAX_OPEN_LEASES:
                dropped.append(self._hits.popitem(last=False)[0])
        for lease_id in dropped:
            self.store.release(lease_id)
        tiers = tuple(
            (str(c.tier.value), span.num_tokens) for c, span in zip(hit.chunks, spans, strict=False)
        )
        return LookupAnswer(min(usable, request.max_tokens), tiers)

    def _take_hit(self, lease_id: str) -> LeasedHit | None:
        with self._lock:
            return self._hits.pop(lease_id, None)

    # -- engine thread ---------------------------------------------------------------------------

    def on_metadata(self, meta: LMCacheDisaggMetadata) -> None:
        self.loader.on_metadata(meta)
        self.saver.on_metadata(meta)

    def after_forward(self) -> None:
        self.saver.after_forward()

    def poll(self, finished_req_ids: set[str]) -> tuple[set[str], set[str]]:
        self.saver.commit_ready()
        done, failed = self.loader.poll(finished_req_ids)
        self.stats.gauge("cache_leases", self.store.leases())
        return done, failed

    def wait_a_little(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for a running fetch; True when there was one."""
        future = self.loader.first_fetch()
        if future is None:
            return False
        try:
            future.result(timeout=seconds)
        except FutureTimeout:
            pass
        except Exception:  # reported by poll()
            pass
        return True

    def drained(self) -> dict[str, int]:
        """Pins, leases and reservations held now (all 0 when idle)."""
        return {
            "pinned_chunks": self.store.pinned_chunks(),
            "leases": self.store.leases(),
            "reserved_pages": self.store.reserved_pages(),
            "pending_loads": self.loader.pending,
        }

    def shutdown(self) -> None:
        self.loader.shutdown()
        self.saver.shutdown()
        with self._lock:
            leases = list(self._hits)
            self._hits.clear()
        for lease_id in leases:
            self.store.release(lease_id)
        self.store.close(timeout=5.0)
        if self.events is not None:
            self.events.close()


def _events_publisher(config: LMCacheDisaggConfig, kv: WorkerKV) -> KVEventPublisher | None:
    """This rank's KV event publisher when ``kv_events_endpoint`` is set (rank r: port + 2r)."""
    if config.kv_events_endpoint is None:
        return None
    from lmcache_disagg.transfer.event_publisher import KVEventPublisher, PublisherSettings

    endpoint = events_endpoint(config.kv_events_endpoint, kv.fingerprint.tp_rank)
    return KVEventPublisher(PublisherSettings(endpoint), kv.fingerprint)


def events_endpoint(configured: str, tp_rank: int) -> str:
    """Rank ``tp_rank``'s PUB endpoint: the configured port + 2 x rank (0 stays ephemeral)."""
    from lmcache_disagg.transfer.event_publisher import split_endpoint

    head, port = split_endpoint(configured)
    return f"{head}:{port + 2 * tp_rank}" if port else configured
