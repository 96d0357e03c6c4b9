"""Storing: gather the chunks a forward completed out of vLLM's paged KV into the chunk store.

The scheduler sends, per scheduled request and step, a :class:`StoreProgress` (its token ids, block
table and how far it is computed after this step). After the forward (``wait_for_save``) the
:class:`CacheSaver` gathers every chunk that became complete into a page the store reserved
(``reserve_page``) and commits it under its chain key; the lower tiers are written asynchronously
inside the store. Chunks the store already holds (``contains``) are skipped, so a prefix loaded
from the cache or pushed by P is not gathered twice. The partial last chunk of the prompt is
stored once the prompt is computed (``save_unfull_chunk``); with ``save_decode_cache`` the chunks
that decode completes are stored too.

Engine thread only. The gathers run on the copy engine; a page is committed only once its gather
has completed (at once on the CPU), and abandoned on every error path.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import torch

from lmcache_disagg.connector.device import Completion, CopyEngine
from lmcache_disagg.connector.keys import chain_root, chunk_keys
from lmcache_disagg.connector.kvcache import WorkerKV
from lmcache_disagg.connector.logonce import LogOnce
from lmcache_disagg.connector.metadata import LMCacheDisaggMetadata, StoreProgress
from lmcache_disagg.connector.stats import StatsRecorder
from lmcache_disagg.kernels import chunk_view, gather

__all__ = ["CacheSaver", "StoreLike"]

MAX_STAGED = 256
"""Gathered pages waiting for their copy to complete (CUDA); beyond it, chunks are skipped."""


class StoreLike(Protocol):
    """What the saver and loader need from :class:`lmcache_disagg.transfer.store.ChunkStore`."""

    def reserve_page(self) -> torch.Tensor | None: ...

    def commit(
        self, page: torch.Tensor, key: bytes, parent: bytes, token_ids: list[int], nbytes: int
    ) -> bool: ...

    def abandon(self, page: torch.Tensor) -> None: ...

    def contains(self, key: bytes) -> object | None: ...


@dataclass(eq=False)
class _Track:
    token_ids: list[int] = field(default_factory=list)
    prompt_len: int = 0
    next_chunk: int = 0
    parent: bytes = b""
    partial_done: bool = False


@dataclass(eq=False)
class _Staged:
    page: torch.Tensor
    key: bytes
    parent: bytes
    token_ids: list[int]
    nbytes: int
    completion: Completion
    started: float


class CacheSaver:
    """All storing of one worker (one TP rank)."""

    def __init__(
        self,
        store: StoreLike,
        kv: WorkerKV,
        copy_engine: CopyEngine,
        stats: StatsRecorder,
        log: LogOnce,
        *,
        save_unfull_chunk: bool,
    ) -> None:
        self._store = store
        self._kv = kv
        self._copy = copy_engine
        self._stats = stats
        self._log = log
        self._save_unfull = save_unfull_chunk
        self._root = chain_root(kv.fingerprint)
        self._tracks: dict[str, _Track] = {}
        self._progress: list[StoreProgress] = []
        self._staged: deque[_Staged] = deque()

    @property
    def tracked(self) -> int:
        return len(self._tracks)

    def on_metadata(self, meta: LMCacheDisaggMetadata) -> None:
        """Record this step's progress (gathered after the forward) and forget finished ones."""
        for req_id in meta.store_dropped:
            self._tracks.pop(req_id, None)
        for progress in meta.store_progress:
            track = self._tracks.get(progress.req_id)
            if track is None:
                track = self._tracks[progress.req_id] = _Track(parent=self._root)
            track.token_ids.extend(progress.new_token_ids)
            track.prompt_len = progress.prompt_len
        self._progress = list(meta.store_progress)

    def after_forward(self) -> None:
        """Gather what this step's forward completed; commit the gathers that are done."""
        progress, self._progress = self._progress, []
        if not progress and not self._staged:
            return
        began = time.perf_counter()
        for item in progress:
            track = self._tracks.get(item.req_id)
            if track is None:
                continue
            if item.block_ids:
                self._gather_ready(track, item)
            if item.final:
                self._tracks.pop(item.req_id, None)
        self.commit_ready()
        self._stats.count("cache_forward_seconds", time.perf_counter() - began)

    def commit_ready(self) -> None:
        while self._staged and self._staged[0].completion.done():
            staged = self._staged.popleft()
            try:
                self._store.commit(
                    staged.page, staged.key, staged.parent, staged.token_ids, staged.nbytes
                )
            except ValueError as exc:  # the store freed the page
                self._log.warning("cache_commit", "chunk not stored: %s", exc)
                self._stats.count("cache_store_skipped", reason="bad_chunk")
                continue
            self._stats.count("cache_tokens_stored", len(staged.token_ids))
            self._stats.observe_tier("store_seconds", "l1", time.monotonic() - staged.started)

    def shutdown(self) -> None:
        for staged in self._staged:
            staged.completion.wait()
            self._store.abandon(staged.page)
        self._staged.clear()
        self._tracks.clear()

    # -- internals -------------------------------------------------------------------------------

    def _gather_ready(self, track: _Track, item: StoreProgress) -> None:
        chunk = self._kv.fingerprint.chunk_size
        known = len(track.token_ids)
        block_ids: torch.Tensor | None = None
        while True:
            start = track.next_chunk * chunk
            end = start + chunk
            if end <= min(item.computed_end, known):
                full = True
            elif (
                self._save_unfull
                and not track.partial_done
                and start < track.prompt_len < end
                and item.computed_end >= track.prompt_len
                and known >= track.prompt_len
            ):
                end = track.prompt_len
                full = False
            else:
                return
            tokens = track.token_ids[start:end]
            key = chunk_keys(track.parent, tokens, chunk)[0]
            if self._store.contains(key) is None:
                if block_ids is None:
                    block_ids = torch.as_tensor(item.block_ids, dtype=torch.int64).to(
                        self._kv.device
                    )
                self._stage(key, track.parent, tokens, start, end, block_ids)
            if not full:
                track.partial_done = True
                return
            track.parent = key
            track.next_chunk += 1

    def _stage(
        self,
        key: bytes,
        parent: bytes,
        tokens: list[int],
        start: int,
        end: int,
        block_ids: torch.Tensor,
    ) -> None:
        if len(self._staged) >= MAX_STAGED:
            self._stats.count("cache_store_skipped", reason="staging_full")
            return
        page = self._store.reserve_page()
        if page is None:
            self._stats.count("cache_store_skipped", reason="no_page")
            return
        kv = self._kv
        num_layers = len(kv.caches)
        n = end - start
        out = chunk_view(page, kv.layout, num_layers, n)
        started = time.monotonic()

        def run() -> None:
            if out.device == kv.device:
                gather(kv.caches, kv.layout, block_ids, start, end, out)
                return
            # GPU caches, host L1 page: gather on the device, then one copy down (copy stream).
            staged = torch.empty(out.shape, dtype=out.dtype, device=kv.device)
            gather(kv.caches, kv.layout, block_ids, start, end, staged)
            out.copy_(staged, non_blocking=True)

        try:
            completion = self._copy.submit(run)
        except Exception as exc:  # a layout bug must cost the cache entry, not the worker
            self._store.abandon(page)
            self._log.warning("cache_gather", "gather for the cache failed: %r", exc)
            self._stats.count("cache_store_skipped", reason="gather_error")
            return
        nbytes = kv.layout.chunk_bytes(num_layers, n)
        self._staged.append(_Staged(page, key, parent, tokens, nbytes, completion, started))
