"""Worker side of the connector: owns the transfer endpoints, the pusher (P) and the loader (D).

One :class:`ConnectorWorker` per vLLM worker process (one per TP rank). All methods are called
from the worker's engine thread, in this order every step: :meth:`bind` (metadata, before the
forward), the forward, :meth:`after_forward` (``wait_for_save``), :meth:`transfer_results`.

A worker whose KV layout is not supported, or whose endpoint could not start, stays *inactive*: it
pushes nothing and fails every load at once, so vLLM recomputes - output stays correct.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

import torch

from lmcache_disagg.config import LMCacheDisaggConfig
from lmcache_disagg.connector.cache import WorkerCache
from lmcache_disagg.connector.device import make_copy_engine
from lmcache_disagg.connector.errors import UnsupportedLayout
from lmcache_disagg.connector.keys import chain_root
from lmcache_disagg.connector.kvcache import (
    WorkerKV,
    describe_kv_caches,
    receiver_config_for_rank,
)
from lmcache_disagg.connector.loader import Loader
from lmcache_disagg.connector.logonce import LogOnce
from lmcache_disagg.connector.lookup import LookupAnswer, LookupServer
from lmcache_disagg.connector.metadata import LMCacheDisaggMetadata
from lmcache_disagg.connector.protocol import LookupRequest
from lmcache_disagg.connector.pusher import Pusher
from lmcache_disagg.connector.reuse import StoreHeld
from lmcache_disagg.connector.stats import LMCacheDisaggStats, StatsRecorder
from lmcache_disagg.transfer.errors import TransferError

if TYPE_CHECKING:
    from lmcache_disagg.transfer import KVReceiver, KVSender

__all__ = ["ConnectorWorker"]

logger = logging.getLogger(__name__)

VERIFY_ENV = "LMCACHE_DISAGG_VERIFY_KV"
IDLE_WAIT = 0.002
"""On a step with nothing to compute, wait up to this long for an arriving transfer instead of
letting the engine loop spin (2 cores are shared by P, D and the proxy here)."""


def _verify_kv() -> bool:
    """``LMCACHE_DISAGG_VERIFY_KV=1``: log per-chunk checksums on P and D (bitwise e2e checks)."""
    return os.environ.get(VERIFY_ENV, "") == "1"


class ConnectorWorker:
    """The worker half. ``is_producer``/``is_consumer`` come from ``kv_role`` (both for kv_both)."""

    def __init__(
        self,
        config: LMCacheDisaggConfig,
        *,
        model: str,
        is_producer: bool,
        is_consumer: bool,
        tp_rank: int,
        tp_size: int,
        use_mla: bool = False,
        lookup_address: str | None = None,
    ) -> None:
        self.config = config
        self.lookup_address = lookup_address
        self.cache: WorkerCache | None = None
        self.lookup_server: LookupServer | None = None
        self.model = model
        self.is_producer = is_producer
        self.is_consumer = is_consumer
        self.tp_rank = tp_rank
        self.tp_size = tp_size
        self.use_mla = use_mla
        self.stats = StatsRecorder()
        self.log = LogOnce(logger)
        self.kv: WorkerKV | None = None
        self.sender: KVSender | None = None
        self.receiver: KVReceiver | None = None
        self.pusher: Pusher | None = None
        self.loader: Loader | None = None
        self._orphan_sends: set[str] = set()
        self._orphan_loads: set[str] = set()
        self._idle = False

    # -- set-up ----------------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Describe the caches and start the endpoints (called once, before any step)."""
        if kv_caches:
            name, sample = next(iter(kv_caches.items()))
            logger.info(
                "lmcache-disagg: %d KV caches, e.g. %s %s strides %s %s",
                len(kv_caches),
                name,
                list(sample.shape),
                list(sample.stride()),
                sample.dtype,
            )
        try:
            self.kv = describe_kv_caches(
                kv_caches,
                model=self.model,
                chunk_size=self.config.chunk_size,
                tp_rank=self.tp_rank,
                tp_size=self.tp_size,
                use_mla=self.use_mla,
            )
        except UnsupportedLayout as exc:
            logger.error("lmcache-disagg connector inactive (everything is recomputed): %s", exc)
            self._start_lookups()
            return
        from lmcache_disagg.transfer import KVReceiver, KVSender

        kv = self.kv
        copy_engine = make_copy_engine(kv.device)
        if self.lookup_address is not None:
            try:
                cache = WorkerCache(self.config, kv, copy_engine, self.stats, self.log)
                cache.start()
                self.cache = cache
                logger.info(
                    "lmcache-disagg rank %d: chunk store on (%s)", self.tp_rank, cache.store.usage()
                )
            except Exception as exc:  # no cache means recompute, never a dead worker
                logger.error("lmcache-disagg chunk store failed to start (no cache): %r", exc)
        self._start_lookups()
        try:
            if self.is_consumer:
                rank_config = receiver_config_for_rank(self.config, self.tp_rank)
                held = None
                if self.cache is not None:
                    held = StoreHeld(
                        self.cache.store, chain_root(kv.fingerprint), kv.fingerprint.chunk_size
                    )
                receiver = KVReceiver(rank_config, kv.fingerprint, held=held)
                receiver.start()
                self.receiver = receiver
                self.loader = Loader(
                    self.config,
                    kv,
                    receiver,
                    copy_engine,
                    self.stats,
                    self.log,
                    extend_ttl=receiver.extend,
                    held_pages=held.pages if held is not None else None,
                )
                self.loader.verify = _verify_kv()
                self.stats.gauge("pool_pages_total", receiver.n_pages)
                logger.info(
                    "lmcache-disagg D rank %d: KV endpoint %s (%s), %d pool pages of %d bytes",
                    self.tp_rank,
                    receiver.endpoint,
                    receiver.channel_kind,
                    receiver.n_pages,
                    receiver.page_bytes,
                )
            if self.is_producer:
                sender = KVSender(self.config, kv.fingerprint)
                sender.start()
                self.sender = sender
                self.pusher = Pusher(self.config, kv, sender, copy_engine, self.stats, self.log)
                self.pusher.verify = _verify_kv()
                self.pusher.start()
                logger.info("lmcache-disagg P rank %d: pushing %s", self.tp_rank, kv.fingerprint)
        except TransferError as exc:
            logger.error("lmcache-disagg connector endpoint failed to start: %s", exc)
            self._shutdown_transfer()

    def _start_lookups(self) -> None:
        """Answer the scheduler's lookups (0 without a store, so it never waits for a timeout)."""
        if self.lookup_address is None:
            return
        server = LookupServer(self.lookup_address, self._answer_lookup)
        try:
            server.start()
        except RuntimeError as exc:
            logger.error("lmcache-disagg cache lookups unavailable: %s", exc)
            return
        self.lookup_server = server

    def _answer_lookup(self, request: LookupRequest) -> LookupAnswer:
        cache = self.cache
        return LookupAnswer(0) if cache is None else cache.answer(request)

    @property
    def endpoint(self) -> str | None:
        return self.receiver.endpoint if self.receiver is not None else None

    # -- per step --------------------------------------------------------------------------------

    def bind(self, meta: LMCacheDisaggMetadata) -> None:
        """Apply the scheduler's decisions for this step (before the forward)."""
        self._idle = not meta.step_has_work
        if self.pusher is not None:
            self.pusher.on_metadata(meta)
        else:
            self._orphan_sends.update(meta.push_finished)
        if self.loader is not None:
            self.loader.on_metadata(meta)
        else:
            for spec in meta.loads:
                self._orphan_loads.add(spec.req_id)
                self.stats.count("fallbacks", reason="inactive")
                self.stats.count("tokens_recomputed", spec.load_end - spec.load_start)
        if self.cache is not None:
            self.cache.on_metadata(meta)
        else:
            for cache_load in meta.cache_loads:
                self._orphan_loads.add(cache_load.req_id)
                self.stats.count("cache_load_failures", reason="inactive")

    def after_forward(self) -> None:
        """``wait_for_save``: gather what this step computed and start sending it."""
        if self.pusher is not None:
            self.pusher.after_forward()
        if self.cache is not None:
            self.cache.after_forward()

    def transfer_results(self, finished_req_ids: set[str]) -> tuple[set[str], set[str], set[str]]:
        """``(finished_sending, finished_recving, failed_recving)`` for this step."""
        if self._idle:
            self._wait_a_little()
        sending: set[str] = set(self._orphan_sends)
        self._orphan_sends.clear()
        recving: set[str] = set(self._orphan_loads)
        failed: set[str] = set(self._orphan_loads)
        self._orphan_loads.clear()
        if self.pusher is not None:
            sending |= self.pusher.take_finished()
        if self.loader is not None:
            done, bad = self.loader.poll(finished_req_ids)
            recving |= done
            failed |= bad
        if self.cache is not None:
            done, bad = self.cache.poll(finished_req_ids)
            recving |= done
            failed |= bad
        if self.sender is not None:
            self.stats.gauge("send_pages_used", self.sender.pages_in_use())
        return sending, recving, failed

    def take_stats(self) -> LMCacheDisaggStats | None:
        return self.stats.take()

    def _wait_a_little(self) -> None:
        if self.cache is not None and self.cache.wait_a_little(IDLE_WAIT):
            return
        if self.loader is not None and self.receiver is not None:
            transfer_id = self.loader.first_waiting()
            if transfer_id is not None:
                self.receiver.wait(transfer_id, IDLE_WAIT)
                return
        if self.pusher is not None and self.pusher.wants_time():
            time.sleep(IDLE_WAIT / 4)

    # -- teardown --------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop everything this worker started. Idempotent."""
        if self.lookup_server is not None:
            self.lookup_server.shutdown()
            self.lookup_server = None
        self._shutdown_transfer()
        if self.cache is not None:
            self.cache.shutdown()
            self.cache = None

    def _shutdown_transfer(self) -> None:
        if self.pusher is not None:
            self.pusher.shutdown()
            self.pusher = None
        if self.loader is not None:
            self.loader.shutdown()
            self.loader = None
        if self.sender is not None:
            self.sender.shutdown()
            self.sender = None
        if self.receiver is not None:
            self.receiver.shutdown()
            self.receiver = None
