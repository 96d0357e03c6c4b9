"""Scheduler side of the connector: decides what P pushes and what D loads, per request.

Runs in vLLM's scheduler (engine-core) process, on the engine thread. It never touches KV or the
network; it turns request state into :class:`LMCacheDisaggMetadata` for the workers.

P (a request with ``do_remote_decode`` + our push fields, from the proxy):
  * ``update_state_after_alloc``: start tracking the push of ``prompt[:-1]`` (D always computes
    the last prompt token itself, so pushing it would be wasted).
  * ``build_connector_meta``: per step, the request's block table and how far its prompt is
    computed after this step, so the worker gathers finished chunks right after the forward.
  * ``request_finished``: return D's ``kv_transfer_params`` and keep the blocks until the worker
    reports the push settled (bounded by ``push_deadline``).

D (a request with ``do_remote_prefill`` + our load fields, i.e. P's answer forwarded by the proxy):
  * ``get_num_new_matched_tokens``: the pushed tokens that match D's own prompt, minus the last
    prompt token, minus what D's prefix cache already has -> async load (WAITING_FOR_REMOTE_KVS).
  * ``update_state_after_alloc``: one :class:`LoadSpec` with the allocated blocks.
  * failures come back from the worker as ``failed_recving``; with
    ``kv_load_failure_policy="recompute"`` (forced by the connector) vLLM then recomputes.

Every other request, in every role, goes to the chunk store's
:class:`~lmcache_disagg.connector.cache_plan.CachePlanner` when a cache tier is on: its cached
leading tokens are loaded instead of computed, and its prompt chunks are stored as they complete.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lmcache_disagg.config import LMCacheDisaggConfig
from lmcache_disagg.connector.errors import ParamsError
from lmcache_disagg.connector.logonce import LogOnce
from lmcache_disagg.connector.metadata import (
    LMCacheDisaggMetadata,
    LoadSpec,
    PushProgress,
    PushStart,
)
from lmcache_disagg.connector.params import (
    LoadParams,
    PushParams,
    decode_params_for,
    parse_load_params,
    parse_push_params,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

    from lmcache_disagg.connector.cache_plan import CachePlanner

__all__ = ["ConnectorScheduler", "plan_load"]

logger = logging.getLogger(__name__)

_FINISHED_OK = ("FINISHED_STOPPED", "FINISHED_LENGTH_CAPPED")


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def plan_load(params: LoadParams, prompt: Sequence[int], chunk_size: int) -> int:
    """How many leading prompt tokens D may load: ``load_end``.

    Only whole chunks of P's push are usable, except P's partial last chunk when D's prompt
    matches all of it; never the last prompt token (vllm#52617: D must compute it).
    """
    pushed = params.num_tokens
    common = _common_prefix(params.prompt_token_ids[:pushed], prompt)
    end = pushed if common >= pushed else (common // chunk_size) * chunk_size
    limit = len(prompt) - 1
    if end > limit:
        end = (limit // chunk_size) * chunk_size
    return max(end, 0)


@dataclass(eq=False)
class _PushReq:
    request: Request
    params: PushParams
    num_tokens: int
    started: bool = False


@dataclass(eq=False)
class _Planned:
    params: LoadParams
    load_start: int
    load_end: int


class ConnectorScheduler:
    """The scheduler half. ``block_ids_of(req_id)`` returns the request's block table."""

    def __init__(
        self,
        config: LMCacheDisaggConfig,
        *,
        is_producer: bool,
        is_consumer: bool,
        block_ids_of: Callable[[str], list[int]],
        cache: CachePlanner | None = None,
    ) -> None:
        self.config = config
        self.cache = cache
        self.is_producer = is_producer
        self.is_consumer = is_consumer
        self._block_ids_of = block_ids_of
        self._log = LogOnce(logger)
        self._pushes: dict[str, _PushReq] = {}
        self._planned: dict[str, _Planned] = {}
        self._loading: set[str] = set()
        self._dispatched: set[str] = set()
        self._meta = LMCacheDisaggMetadata()

    # -- D ---------------------------------------------------------------------------------------

    def _load_params(self, request: Request) -> LoadParams | None:
        try:
            return parse_load_params(request.kv_transfer_params)
        except ParamsError as exc:
            self._log.warning(
                "bad_params", "ignoring kv_transfer_params of %s: %s", request.request_id, exc
            )
            return None

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int, bool]:
        """Tokens D will load for ``request`` beyond ``num_computed_tokens``; always async.

        Called by the scheduler for a waiting request, possibly several times; it only records
        the latest plan. Returns ``(0, False)`` for requests that carry no pushed KV of ours.
        """
        if request.request_id in self._dispatched:
            return 0, False
        params = self._load_params(request) if self.is_consumer else None
        if params is None or params.num_tokens == 0:
            if self.cache is not None:
                return self.cache.match(request, num_computed_tokens, self._meta)
            return 0, False
        prompt = request.prompt_token_ids or []
        load_end = plan_load(params, prompt, self.config.chunk_size)
        if load_end <= num_computed_tokens:
            self._planned.pop(request.request_id, None)
            return 0, False
        self._planned[request.request_id] = _Planned(params, num_computed_tokens, load_end)
        return load_end - num_computed_tokens, True

    def _d_after_alloc(self, request: Request, num_external_tokens: int) -> None:
        req_id = request.request_id
        if req_id in self._dispatched:
            return  # the second call, after the load finished
        planned = self._planned.pop(req_id, None)
        if planned is None:
            return
        if num_external_tokens <= 0:
            self._meta.releases.append(planned.params.transfer_id)
            return
        load_end = planned.load_start + num_external_tokens
        prompt = request.prompt_token_ids or []
        self._loading.add(req_id)
        self._dispatched.add(req_id)
        self._meta.loads.append(
            LoadSpec(
                req_id=req_id,
                transfer_id=planned.params.transfer_id,
                block_ids=list(self._block_ids_of(req_id)),
                load_start=planned.load_start,
                load_end=load_end,
                num_pushed=planned.params.num_tokens,
                token_ids=list(prompt[:load_end]),
            )
        )

    # -- P ---------------------------------------------------------------------------------------

    def _p_after_alloc(self, request: Request) -> None:
        req_id = request.request_id
        if req_id in self._pushes:
            return
        try:
            params = parse_push_params(request.kv_transfer_params)
        except ParamsError as exc:
            self._log.warning("bad_params", "not pushing %s: %s", req_id, exc)
            return
        if params is None:
            return
        prompt = request.prompt_token_ids or []
        self._pushes[req_id] = _PushReq(request, params, max(len(prompt) - 1, 0))

    # -- hooks -----------------------------------------------------------------------------------

    def update_state_after_alloc(self, request: Request, num_external_tokens: int) -> None:
        """After the scheduler allocated blocks for ``request`` (once or twice per request)."""
        if self.is_consumer:
            self._d_after_alloc(request, num_external_tokens)
        if self.is_producer:
            self._p_after_alloc(request)
        if self.cache is not None:
            self.cache.after_alloc(request, num_external_tokens, self._meta)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> LMCacheDisaggMetadata:
        """Hand this step's decisions to the workers and start collecting the next step's."""
        meta, self._meta = self._meta, LMCacheDisaggMetadata()
        scheduled = scheduler_output.num_scheduled_tokens
        meta.step_has_work = bool(scheduler_output.total_num_scheduled_tokens)
        preempted = getattr(scheduler_output, "preempted_req_ids", None) or set()
        for req_id, push in self._pushes.items():
            if req_id in preempted:
                meta.push_progress.append(PushProgress(req_id, [], 0))
                continue
            if req_id not in scheduled:
                continue
            request = push.request
            if not push.started and push.num_tokens > 0:
                push.started = True
                prompt = request.prompt_token_ids or []
                meta.push_starts.append(
                    PushStart(
                        req_id=req_id,
                        transfer_id=push.params.transfer_id,
                        target=push.params.target,
                        token_ids=list(prompt[: push.num_tokens]),
                    )
                )
            computed_end = request.num_computed_tokens + scheduled[req_id]
            meta.push_progress.append(
                PushProgress(req_id, list(self._block_ids_of(req_id)), computed_end)
            )
        if self.cache is not None:
            self.cache.progress(scheduler_output, meta)
        return meta

    def request_finished(self, request: Request) -> tuple[bool, dict[str, Any] | None]:
        """Called once per finished request, before vLLM frees its blocks.

        Returns ``(keep_blocks, kv_transfer_params)``. P keeps the blocks of a completed prefill
        whose push started (the worker reports it in ``finished_sending`` once settled); D never
        keeps blocks here (vLLM itself holds those of a request still waiting for its KV).
        """
        req_id = request.request_id
        if self.cache is not None:
            self.cache.finished(request, self._meta)
        if self.is_consumer:
            self._planned.pop(req_id, None)
            if req_id not in self._dispatched:
                # Never loaded (aborted while waiting, or nothing usable): free P's push on D.
                params = self._load_params(request)
                if params is not None and params.num_tokens > 0:
                    self._meta.releases.append(params.transfer_id)
            self._dispatched.discard(req_id)
            self._loading.discard(req_id)
        push = self._pushes.pop(req_id, None)
        if push is None:
            return False, None
        completed = request.status.name in _FINISHED_OK and (
            request.num_computed_tokens >= push.num_tokens
        )
        if not completed:
            if push.started:
                self._meta.push_cancelled.append(req_id)
            return False, None
        prompt = request.prompt_token_ids or []
        params = decode_params_for(
            push.params, list(prompt), push.num_tokens if push.started else 0
        )
        if not push.started:
            return False, params
        self._meta.push_finished.append(req_id)
        return True, params

    def update_connector_output(self, output: KVConnectorOutput) -> None:
        """Loads the workers finished (or gave up on) are no longer ours to track."""
        for req_id in output.finished_recving or ():
            self._loading.discard(req_id)
            if self.cache is not None:
                self.cache.load_settled(req_id)

    def hit_sources(self, request: Request, num_tokens: int) -> dict[str, int]:
        """Where this step's external tokens of ``request`` come from: ``p2p`` (P's push) or
        the store's tiers (``l1``/``l2``/``l3``); empty when unknown."""
        if num_tokens <= 0:
            return {}
        if request.request_id in self._dispatched:
            return {"p2p": num_tokens}
        if self.cache is not None:
            return self.cache.hit_sources(request.request_id, num_tokens)
        return {}

    def has_pending_work(self) -> bool:
        """Decisions not yet handed to the workers (keeps the engine stepping)."""
        return not self._meta.is_empty()
