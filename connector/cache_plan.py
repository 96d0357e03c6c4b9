"""Scheduler side of the chunk store: what to load from the cache, what the workers store.

Runs in vLLM's scheduler process, on the engine thread, next to
:class:`~lmcache_disagg.connector.scheduler.ConnectorScheduler`, which delegates every request
without pushed KV of P's here.

* ``match``: asks every rank's store (:class:`~lmcache_disagg.connector.lookup.LookupClient`,
  bounded by a deadline) how many leading prompt tokens it holds, pinning the hit under a fresh
  lease. It offers only tokens beyond ``num_computed_tokens`` (vLLM's own prefix cache wins) and
  never the last prompt token. The answer for a request is kept while it waits, so repeated
  calls of ``get_num_new_matched_tokens`` do not repeat the lookup.
* ``after_alloc``: turns the plan into a :class:`CacheLoad` (async: ``WAITING_FOR_REMOTE_KVS``) or
  releases the lease when vLLM scheduled the request without it.
* ``progress``: per step, a :class:`StoreProgress` for each tracked request, so the workers store
  the prompt chunks the forward completed (and decode's, with ``save_decode_cache``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lmcache_disagg.connector.logonce import LogOnce
from lmcache_disagg.connector.metadata import CacheLoad, LMCacheDisaggMetadata, StoreProgress
from lmcache_disagg.connector.protocol import PROTOCOL_VERSION, LookupRequest
from lmcache_disagg.connector.stats import StatsRecorder

if TYPE_CHECKING:
    from collections.abc import Callable

    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

    from lmcache_disagg.connector.lookup import LookupClient

__all__ = ["CachePlanner", "tier_split"]

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _Plan:
    lease_id: str
    load_start: int
    load_end: int
    spans: tuple[tuple[str, int], ...] = ()


@dataclass(eq=False)
class _Tracked:
    request: Request
    sent: int = 0


def tier_split(spans: tuple[tuple[str, int], ...], start: int, end: int) -> dict[str, int]:
    """Tokens of ``[start, end)`` per tier; ``spans`` are consecutive (tier, tokens) pieces."""
    out: dict[str, int] = {}
    pos = 0
    for tier, tokens in spans:
        lo, hi = max(pos, start), min(pos + tokens, end)
        if hi > lo:
            out[tier] = out.get(tier, 0) + hi - lo
        pos += tokens
    return out


class CachePlanner:
    """The cache half of the scheduler. ``block_ids_of(req_id)`` returns the block table."""

    def __init__(
        self,
        client: LookupClient,
        *,
        block_size: int,
        save_decode_cache: bool,
        block_ids_of: Callable[[str], list[int]],
        stats: StatsRecorder,
    ) -> None:
        self._client = client
        self._block_size = block_size
        self._save_decode = save_decode_cache
        self._block_ids_of = block_ids_of
        self._stats = stats
        self._log = LogOnce(logger)
        self._plans: dict[str, _Plan] = {}
        self._loading: set[str] = set()
        self._tracked: dict[str, _Tracked] = {}
        self._sources: dict[str, dict[str, int]] = {}
        self._seq = 0

    def match(
        self, request: Request, num_computed_tokens: int, meta: LMCacheDisaggMetadata
    ) -> tuple[int, bool]:
        req_id = request.request_id
        if req_id in self._loading:
            return 0, False
        prompt = list(request.prompt_token_ids or [])
        max_tokens = len(prompt) - 1
        old = self._plans.get(req_id)
        if old is not None and old.load_start == num_computed_tokens:
            return old.load_end - old.load_start, True
        self._drop_plan(req_id, meta)
        if max_tokens <= num_computed_tokens:
            return 0, False
        self._seq += 1
        lease_id = f"{req_id}#{self._seq}"
        result = self._client.lookup(
            LookupRequest(PROTOCOL_VERSION, lease_id, prompt, max_tokens, self._block_size)
        )
        found, error = result.num_tokens, result.error
        self._stats.count("cache_lookups")
        if error:
            self._stats.count("cache_load_failures", reason=f"lookup_{error}")
            self._log.warning(f"lookup_{error}", "cache lookup of %s failed: %s", req_id, error)
        found = min(found, max_tokens)
        if found <= num_computed_tokens:
            meta.cache_releases.append(lease_id)
            return 0, False
        self._plans[req_id] = _Plan(lease_id, num_computed_tokens, found, result.spans)
        return found - num_computed_tokens, True

    def _drop_plan(self, req_id: str, meta: LMCacheDisaggMetadata) -> None:
        plan = self._plans.pop(req_id, None)
        if plan is not None:
            meta.cache_releases.append(plan.lease_id)

    def after_alloc(
        self, request: Request, num_external_tokens: int, meta: LMCacheDisaggMetadata
    ) -> None:
        req_id = request.request_id
        self._tracked.setdefault(req_id, _Tracked(request))
        plan = self._plans.pop(req_id, None)
        if plan is None:
            return
        if num_external_tokens <= 0:
            meta.cache_releases.append(plan.lease_id)
            return
        self._loading.add(req_id)
        load_end = plan.load_start + num_external_tokens
        self._sources[req_id] = tier_split(plan.spans, plan.load_start, load_end)
        meta.cache_loads.append(
            CacheLoad(
                req_id=req_id,
                lease_id=plan.lease_id,
                block_ids=list(self._block_ids_of(req_id)),
                load_start=plan.load_start,
                load_end=load_end,
            )
        )

    def progress(self, scheduler_output: SchedulerOutput, meta: LMCacheDisaggMetadata) -> None:
        scheduled = scheduler_output.num_scheduled_tokens
        preempted = getattr(scheduler_output, "preempted_req_ids", None) or set()
        for req_id, tracked in list(self._tracked.items()):
            if req_id in preempted or req_id not in scheduled:
                continue
            request = tracked.request
            prompt = request.prompt_token_ids or []
            computed_end = request.num_computed_tokens + scheduled[req_id]
            if self._save_decode:
                tokens = list(getattr(request, "all_token_ids", prompt))
                target = max(len(prompt), min(computed_end, len(tokens)))
            else:
                tokens = list(prompt)
                target = len(prompt)
            final = not self._save_decode and computed_end >= len(prompt)
            meta.store_progress.append(
                StoreProgress(
                    req_id=req_id,
                    new_token_ids=tokens[tracked.sent : target],
                    block_ids=list(self._block_ids_of(req_id)),
                    computed_end=computed_end,
                    prompt_len=len(prompt),
                    final=final,
                )
            )
            tracked.sent = max(tracked.sent, target)
            if final:
                del self._tracked[req_id]

    def hit_sources(self, req_id: str, num_tokens: int) -> dict[str, int]:
        """Tokens of the planned load per tier (``l1``/``l2``/``l3``), summing to ``num_tokens``."""
        split = self._sources.pop(req_id, {})
        if sum(split.values()) != num_tokens:
            return {}
        return split

    def finished(self, request: Request, meta: LMCacheDisaggMetadata) -> None:
        req_id = request.request_id
        self._sources.pop(req_id, None)
        self._drop_plan(req_id, meta)
        self._loading.discard(req_id)
        if self._tracked.pop(req_id, None) is not None:
            meta.store_dropped.append(req_id)

    def load_settled(self, req_id: str) -> None:
        self._loading.discard(req_id)

    def close(self) -> None:
        self._client.close()
