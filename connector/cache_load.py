"""Loading a cache hit: fetch the leased chunks from the store, scatter them into vLLM's blocks.

The scheduler's lookup pinned the hit under a lease and put the request in
``WAITING_FOR_REMOTE_KVS``; the worker receives a :class:`CacheLoad`. :class:`CacheLoader` runs
``store.fetch(lease)`` on its fetch thread (a lower-tier hit reads disk or Redis there, never on
the forward path), then, on the engine thread, scatters tokens ``[load_start, load_end)`` into the
request's blocks - a token sub-range of a page when only the first tokens of a chunk match - and
releases the lease once the copy completed. Any failure (``CacheMiss``, a timeout, an unknown
lease, an abort) releases the lease and reports the request in ``failed_recving``: vLLM
(``kv_load_failure_policy=recompute``) recomputes it, and the reason is counted. Wrong KV is never
loaded: the store verified every chunk against the prompt's tokens before handing it out.

The fetch queue is bounded by vLLM itself: at most one load per waiting request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import torch

from lmcache_disagg.connector.device import Completion, CopyEngine
from lmcache_disagg.connector.kvcache import WorkerKV
from lmcache_disagg.connector.logonce import LogOnce
from lmcache_disagg.connector.metadata import CacheLoad, LMCacheDisaggMetadata
from lmcache_disagg.connector.stats import StatsRecorder
from lmcache_disagg.kernels import chunk_view, scatter

__all__ = ["CacheLoader", "HitSpan", "LeasedHit"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HitSpan:
    """One chunk of a hit: it stores ``stored_tokens`` tokens; the first ``num_tokens`` match."""

    num_tokens: int
    stored_tokens: int


@dataclass(frozen=True)
class LeasedHit:
    """What this rank's lookup found and pinned under ``lease_id``."""

    lease_id: str
    num_tokens: int
    spans: list[HitSpan]


class FetchStore(Protocol):
    def fetch(self, lease_id: str, timeout: float) -> list[torch.Tensor]: ...

    def release(self, lease_id: str) -> None: ...


@dataclass(eq=False)
class _Job:
    spec: CacheLoad
    hit: LeasedHit | None
    registered: float
    future: Future[list[torch.Tensor]] | None = None
    completion: Completion | None = None
    keep: list[torch.Tensor] = field(default_factory=list)
    nbytes: int = 0


class CacheLoader:
    """Pending cache loads of one worker. Engine-thread API plus one fetch thread."""

    def __init__(
        self,
        store: FetchStore,
        kv: WorkerKV,
        copy_engine: CopyEngine,
        stats: StatsRecorder,
        log: LogOnce,
        *,
        take_hit: Callable[[str], LeasedHit | None],
        fetch_timeout: float,
    ) -> None:
        self._store = store
        self._kv = kv
        self._copy = copy_engine
        self._stats = stats
        self._log = log
        self._take_hit = take_hit
        self._fetch_timeout = fetch_timeout
        self._jobs: dict[str, _Job] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmcd-cache-fetch")

    @property
    def pending(self) -> int:
        return len(self._jobs)

    def on_metadata(self, meta: LMCacheDisaggMetadata) -> None:
        now = time.monotonic()
        take = self._take_hit
        for lease_id in meta.cache_releases:
            take(lease_id)
            self._store.release(lease_id)
        for spec in meta.cache_loads:
            if spec.req_id in self._jobs:
                continue
            hit = take(spec.lease_id)
            job = _Job(spec, hit, now)
            if hit is not None:
                job.future = self._pool.submit(
                    self._store.fetch, spec.lease_id, self._fetch_timeout
                )
            self._jobs[spec.req_id] = job

    def first_fetch(self) -> Future[list[torch.Tensor]] | None:
        """A fetch still running (an idle engine may wait on it briefly)."""
        for job in self._jobs.values():
            if job.future is not None and not job.future.done():
                return job.future
        return None

    def poll(self, finished_req_ids: set[str]) -> tuple[set[str], set[str]]:
        """``(finished_recving, failed_recving)`` of this step; never blocks on I/O."""
        finished: set[str] = set()
        failed: set[str] = set()
        for req_id, job in list(self._jobs.items()):
            outcome = self._step(job, req_id in finished_req_ids)
            if outcome is None:
                continue
            del self._jobs[req_id]
            job.keep = []
            self._store.release(job.spec.lease_id)
            finished.add(req_id)
            if outcome != "ok":
                failed.add(req_id)
        self._stats.gauge("cache_pending_loads", len(self._jobs))
        return finished, failed

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        for job in self._jobs.values():
            if job.completion is not None:
                job.completion.wait()
            self._store.release(job.spec.lease_id)
        self._jobs.clear()

    # -- internals -------------------------------------------------------------------------------

    def _step(self, job: _Job, aborted: bool) -> str | None:
        if job.completion is not None:
            return self._loaded(job) if job.completion.done() else None
        if job.hit is None:
            return self._fail(job, "lease_unknown", "no lookup result for this lease")
        assert job.future is not None
        if not job.future.done():
            return None  # the fetch is bounded by its own timeout
        if aborted:
            return self._fail(job, "aborted", "the request finished before its KV was loaded")
        try:
            pages = job.future.result()
        except Exception as exc:  # CacheMiss, or a store bug: recompute either way
            return self._fail(job, str(getattr(exc, "reason", "fetch_error")), str(exc))
        return self._scatter(job, pages)

    def _scatter(self, job: _Job, pages: list[torch.Tensor]) -> str | None:
        spec, hit = job.spec, job.hit
        assert hit is not None
        kv = self._kv
        chunk = kv.fingerprint.chunk_size
        num_layers = len(kv.caches)
        if len(pages) != len(hit.spans) or spec.load_end > hit.num_tokens:
            return self._fail(job, "short_hit", f"{len(pages)} pages for {len(hit.spans)} chunks")
        jobs: list[tuple[torch.Tensor, int, int]] = []
        for index, (page, span) in enumerate(zip(pages, hit.spans, strict=True)):
            start = index * chunk
            lo, hi = max(start, spec.load_start), min(start + span.num_tokens, spec.load_end)
            if lo >= hi:
                continue
            if page.numel() < kv.layout.chunk_bytes(num_layers, span.stored_tokens):
                return self._fail(job, "bad_size", f"chunk {index} page is too small")
            view = chunk_view(page, kv.layout, num_layers, span.stored_tokens)
            if (lo - start, hi - start) != (0, span.stored_tokens):
                view = view[:, :, lo - start : hi - start].contiguous()
            jobs.append((view, lo, hi))
            job.nbytes += kv.layout.chunk_bytes(num_layers, hi - lo)
        block_ids = torch.as_tensor(spec.block_ids, dtype=torch.int64).to(kv.device)

        def run() -> None:
            for view, lo, hi in jobs:
                src = view if view.device == kv.device else view.to(kv.device, non_blocking=True)
                scatter(src, kv.caches, kv.layout, block_ids, lo, hi)

        try:
            job.completion = self._copy.submit(run)
        except Exception as exc:  # a layout bug must not take the worker down: recompute
            return self._fail(job, "scatter_error", repr(exc))
        job.keep = [view for view, _, _ in jobs]
        return self._loaded(job) if job.completion.done() else None

    def _loaded(self, job: _Job) -> str:
        spec = job.spec
        self._stats.count("cache_loads")
        self._stats.count("cache_tokens_loaded", spec.load_end - spec.load_start)
        self._stats.observe("load_wait_seconds", time.monotonic() - job.registered)
        return "ok"

    def _fail(self, job: _Job, reason: str, detail: str) -> str:
        spec = job.spec
        self._stats.count("cache_load_failures", reason=reason)
        self._stats.count("tokens_recomputed", spec.load_end - spec.load_start)
        self._log.warning(
            f"cache_{reason}",
            "cache load of request %s failed: %s (%s); recomputing %d tokens",
            spec.req_id,
            reason,
            detail,
            spec.load_end - spec.load_start,
        )
        return reason
