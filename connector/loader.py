"""D side: wait for P's pushed chunks, verify them, scatter them into the request's blocks.

The scheduler put the request in ``WAITING_FOR_REMOTE_KVS`` and sent a :class:`LoadSpec`. Each
engine step :meth:`Loader.poll` checks every pending load without blocking:

* transfer COMPLETE -> check the chunk count, sizes and every needed chunk's key against the keys D
  computes from ITS OWN prompt tokens (never load KV for a different prompt), scatter the tokens
  ``[load_start, load_end)`` into the blocks, free the pool pages, report ``finished_recving``;
* FAILED, key mismatch, deadline passed, still UNKNOWN after the grace period (P never reserved),
  or the request was aborted -> free the pages and report the request in ``failed_recving`` (and
  ``finished_recving``) so vLLM (``kv_load_failure_policy=recompute``) recomputes the prompt; the
  reason is counted and logged once.

The last prompt token is never loaded: the scheduler's ``load_end`` stops before it.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from lmcache_disagg.config import LMCacheDisaggConfig
from lmcache_disagg.connector.checksum import log_checksum
from lmcache_disagg.connector.device import Completion, CopyEngine
from lmcache_disagg.connector.keys import chain_root, chunk_keys, chunk_spans
from lmcache_disagg.connector.kvcache import WorkerKV
from lmcache_disagg.connector.logonce import LogOnce
from lmcache_disagg.connector.metadata import LMCacheDisaggMetadata, LoadSpec
from lmcache_disagg.connector.stats import StatsRecorder
from lmcache_disagg.kernels import chunk_view, gather, scatter
from lmcache_disagg.transfer.errors import TransferError
from lmcache_disagg.transfer.state import ReceivedChunk, RecvState, TransferState

__all__ = ["SIBLING_LINGER", "Loader", "ReceiverLike", "unknown_grace"]

logger = logging.getLogger(__name__)

SIBLING_LINGER = 2.0
"""Seconds a consumed transfer stays in the pool when the request is one of vLLM's ``n > 1``
children (ids ``<index>_<parent>``): its siblings carry the same transfer id and may be scheduled a
little later. Other transfers are freed as soon as their KV is in place."""
_CHILD_ID = re.compile(r"^\d+_")


def unknown_grace(config: LMCacheDisaggConfig) -> float:
    """How long D waits for a transfer it has never heard of before recomputing.

    P opens the reservation while it prefills, so it normally exists before D even sees the
    request; P gives up on it after connect + reserve timeouts, so waiting longer is pointless.
    """
    return min(config.load_deadline, config.connect_timeout + config.reserve_timeout)


class ReceiverLike(Protocol):
    """What the loader needs from :class:`lmcache_disagg.transfer.KVReceiver`."""

    def poll(self, transfer_id: str) -> TransferState: ...

    def chunks(self, transfer_id: str) -> list[ReceivedChunk]: ...

    def release(self, transfer_id: str) -> None: ...

    def occupancy(self) -> int: ...


@dataclass(eq=False)
class _Load:
    spec: LoadSpec
    registered: float
    deadline: float
    grace_deadline: float
    completion: Completion | None = None
    keep: list[torch.Tensor] = field(default_factory=list)
    nbytes: int = 0


class Loader:
    """All pending loads of one D worker (one TP rank). Engine thread only."""

    def __init__(
        self,
        config: LMCacheDisaggConfig,
        kv: WorkerKV,
        receiver: ReceiverLike,
        copy_engine: CopyEngine,
        stats: StatsRecorder,
        log: LogOnce,
        extend_ttl: Callable[[str, float], None] | None = None,
        held_pages: Callable[[str, int], list[torch.Tensor]] | None = None,
    ) -> None:
        """``held_pages(transfer_id, n)``: the store pages of a transfer's first ``n`` chunks that
        D already held at reservation time (P did not push them; see connector/reuse.py)."""
        self._config = config
        self._kv = kv
        self._receiver = receiver
        self._copy = copy_engine
        self._stats = stats
        self._log = log
        self._root = chain_root(kv.fingerprint)
        self._loads: dict[str, _Load] = {}
        self._grace = unknown_grace(config)
        self._extend_ttl = extend_ttl
        self._held_pages = held_pages
        self.verify = False
        """Re-gather each loaded chunk from the paged cache and log its xxh3 (tests only)."""

    @property
    def pending(self) -> int:
        return len(self._loads)

    def on_metadata(self, meta: LMCacheDisaggMetadata) -> None:
        now = time.monotonic()
        for spec in meta.loads:
            if spec.req_id in self._loads:
                continue
            self._loads[spec.req_id] = _Load(
                spec,
                registered=now,
                deadline=now + self._config.load_deadline,
                grace_deadline=now + self._grace,
            )
        for transfer_id in meta.releases:
            if not any(load.spec.transfer_id == transfer_id for load in self._loads.values()):
                self._receiver.release(transfer_id)

    def poll(self, finished_req_ids: set[str]) -> tuple[set[str], set[str]]:
        """``(finished_recving, failed_recving)`` for this step; never blocks on the network."""
        finished: set[str] = set()
        failed: set[str] = set()
        now = time.monotonic()
        for req_id, load in list(self._loads.items()):
            outcome = self._step(load, req_id in finished_req_ids, now)
            if outcome is None:
                continue
            del self._loads[req_id]
            finished.add(req_id)
            if outcome != "ok":
                failed.add(req_id)
            self._free_transfer(load)
        self._stats.gauge("pending_loads", len(self._loads))
        self._stats.gauge("pool_pages_used", self._receiver.occupancy())
        return finished, failed

    def first_waiting(self) -> str | None:
        """A transfer id still arriving (the engine may wait on it briefly when idle)."""
        for load in self._loads.values():
            if load.completion is None:
                return load.spec.transfer_id
        return None

    def shutdown(self) -> None:
        for load in self._loads.values():
            if load.completion is not None:
                load.completion.wait()
            self._receiver.release(load.spec.transfer_id)
        self._loads.clear()

    # -- internals -------------------------------------------------------------------------------

    def _step(self, load: _Load, aborted: bool, now: float) -> str | None:
        """None while pending; "ok" when loaded; else the failure reason (already counted)."""
        spec = load.spec
        if load.completion is not None:
            if not load.completion.done():
                return None
            return self._loaded(load, now)
        if aborted:
            return self._fail(load, "aborted", "the request finished before its KV arrived")
        state = self._receiver.poll(spec.transfer_id)
        if state.state is RecvState.COMPLETE:
            return self._scatter(load, now)
        if state.state is RecvState.FAILED:
            return self._fail(load, f"transfer_{state.reason or 'failed'}", state.reason)
        if state.state is RecvState.UNKNOWN and now > load.grace_deadline:
            return self._fail(load, "unknown_transfer", "P never reserved room for it")
        if now > load.deadline:
            return self._fail(load, "deadline", f"{state.chunks_received}/{state.chunks_expected}")
        return None

    def _scatter(self, load: _Load, now: float) -> str | None:
        spec = load.spec
        kv = self._kv
        chunk_size = kv.fingerprint.chunk_size
        try:
            chunks = self._receiver.chunks(spec.transfer_id)
        except TransferError as exc:
            return self._fail(load, "transfer_gone", str(exc))
        spans = chunk_spans(spec.num_pushed, chunk_size)
        if len(chunks) != len(spans):
            return self._fail(load, "bad_chunks", f"{len(chunks)} chunks, expected {len(spans)}")
        try:
            expected = chunk_keys(self._root, spec.token_ids, chunk_size, spec.load_end)
        except ValueError as exc:
            return self._fail(load, "bad_tokens", str(exc))
        block_ids = torch.as_tensor(spec.block_ids, dtype=torch.int64)
        num_layers = len(kv.caches)
        jobs: list[tuple[torch.Tensor, int, int]] = []
        held: list[torch.Tensor] = []
        n_held = sum(1 for chunk in chunks if chunk.held)
        if n_held and spans[n_held - 1][1] > spec.load_start:
            if self._held_pages is None or any(not c.held for c in chunks[:n_held]):
                return self._fail(load, "held_chunks", "held chunks without a store")
            try:
                held = self._held_pages(spec.transfer_id, n_held)
            except Exception as exc:  # CacheMiss, a timeout, a store bug: recompute
                return self._fail(load, "held_fetch", repr(exc))
        for index, key in enumerate(expected):
            chunk = chunks[index]
            start, end = spans[index]
            if chunk.index != index or chunk.num_tokens != end - start:
                return self._fail(load, "bad_chunks", f"chunk {index} holds {chunk.num_tokens}")
            if chunk.key != key:
                return self._fail(load, "key_mismatch", f"chunk {index} is for another prompt")
            if chunk.held:
                lo, hi = max(start, spec.load_start), min(end, spec.load_end)
                if lo >= hi:
                    continue
                size = kv.layout.chunk_bytes(num_layers, end - start)
                if index >= len(held) or held[index].numel() < size:
                    return self._fail(load, "held_fetch", f"held chunk {index} unreadable")
                chunk = ReceivedChunk(index, chunk.num_tokens, key, held[index][:size], True)
            if chunk.data.numel() != kv.layout.chunk_bytes(num_layers, end - start):
                return self._fail(load, "bad_chunks", f"chunk {index} has a wrong size")
            lo, hi = max(start, spec.load_start), min(end, spec.load_end)
            if lo >= hi:
                continue
            view = chunk_view(chunk.data, kv.layout, num_layers, end - start)
            if (lo, hi) != (start, end):
                view = view[:, :, lo - start : hi - start].contiguous()
            jobs.append((view, lo, hi))
            if not chunk.held:
                load.nbytes += chunk.data.numel()

        def run() -> None:
            # A host pool feeding GPU caches: the upload runs on the copy stream too.
            for view, lo, hi in jobs:
                src = view if view.device == kv.device else view.to(kv.device, non_blocking=True)
                scatter(src, kv.caches, kv.layout, block_ids, lo, hi)

        try:
            load.completion = self._copy.submit(run)
        except Exception as exc:  # a layout bug must not take D down: recompute instead
            return self._fail(load, "scatter_error", repr(exc))
        load.keep = [view for view, _, _ in jobs]
        if load.completion.done():
            return self._loaded(load, now)
        return None

    def _loaded(self, load: _Load, now: float) -> str:
        spec = load.spec
        load.keep = []
        if self.verify:
            self._log_loaded(spec)
        self._stats.count("loads")
        self._stats.count("tokens_loaded", spec.load_end - spec.load_start)
        self._stats.count("bytes_received", load.nbytes)
        self._stats.observe("load_wait_seconds", now - load.registered)
        return "ok"

    def _log_loaded(self, spec: LoadSpec) -> None:
        kv = self._kv
        block_ids = torch.as_tensor(spec.block_ids, dtype=torch.int64)
        num_layers = len(kv.caches)
        spans = chunk_spans(spec.num_pushed, kv.fingerprint.chunk_size)
        for index, (start, end) in enumerate(spans):
            if start < spec.load_start or end > spec.load_end:
                continue
            shape = kv.layout.chunk_shape(num_layers, end - start)
            out = torch.empty(shape, dtype=kv.layout.dtype, device=kv.device)
            gather(kv.caches, kv.layout, block_ids.to(kv.device), start, end, out)
            log_checksum("D", spec.transfer_id, index, out.view(torch.uint8).reshape(-1))

    def _fail(self, load: _Load, reason: str, detail: str) -> str:
        spec = load.spec
        self._stats.count("fallbacks", reason=reason)
        self._stats.count("tokens_recomputed", spec.load_end - spec.load_start)
        self._log.warning(
            reason,
            "KV load of request %s (transfer %s) failed: %s (%s); recomputing %d tokens",
            spec.req_id,
            spec.transfer_id,
            reason,
            detail,
            spec.load_end - spec.load_start,
        )
        return reason

    def _free_transfer(self, load: _Load) -> None:
        transfer_id = load.spec.transfer_id
        if any(other.spec.transfer_id == transfer_id for other in self._loads.values()):
            return  # a sibling (n > 1) still needs it
        if _CHILD_ID.match(load.spec.req_id) and self._extend_ttl is not None:
            self._extend_ttl(transfer_id, SIBLING_LINGER)
            return
        self._receiver.release(transfer_id)
