"""``LMCacheDisaggConnector``: the thin vLLM ``KVConnectorBase_V1`` facade.

Load it with::

    --kv-transfer-config '{"kv_connector": "LMCacheDisaggConnector",
                           "kv_connector_module_path": "lmcache_disagg.connector",
                           "kv_role": "kv_producer" | "kv_consumer" | "kv_both",
                           "kv_load_failure_policy": "recompute",
                           "kv_connector_extra_config": {"channel": "tcp", "listen_port": 17555}}'

``kv_connector_extra_config`` holds lmcache-disagg config keys (see ``configs/``); they override
``LMCACHE_CONFIG_FILE`` and are overridden by ``LMCACHE_<KEY>`` env vars. The facade builds a
:class:`~lmcache_disagg.connector.scheduler.ConnectorScheduler` in the scheduler process or a
:class:`~lmcache_disagg.connector.worker.ConnectorWorker` in each worker and forwards every hook.

Failure policy: a failed load must be recomputed, never used and never fail the request, so the
connector sets ``kv_load_failure_policy = "recompute"`` when it was left at vLLM's default
``"fail"`` (it is read by the scheduler right after the connector is built).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
)

from lmcache_disagg.config import load_config
from lmcache_disagg.connector.cache import cache_enabled
from lmcache_disagg.connector.cache_plan import CachePlanner
from lmcache_disagg.connector.info import model_id
from lmcache_disagg.connector.lookup import LookupClient, lookup_address, lookup_timeout
from lmcache_disagg.connector.metadata import LMCacheDisaggMetadata
from lmcache_disagg.connector.scheduler import ConnectorScheduler
from lmcache_disagg.connector.stats import (
    LMCacheDisaggPromMetrics,
    LMCacheDisaggStats,
    StatsRecorder,
)

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
        KVConnectorPromMetrics,
        KVConnectorStats,
        PromMetric,
        PromMetricT,
    )
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.metrics.cache_hit_source import CacheHitSource
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

    from lmcache_disagg.connector.worker import ConnectorWorker

__all__ = ["LMCacheDisaggConnector"]

logger = logging.getLogger(__name__)


def _route_logs_to_vllm() -> None:
    """Send ``lmcache_disagg.*`` records through vLLM's handlers (same format, same stream)."""
    ours = logging.getLogger("lmcache_disagg")
    if ours.handlers:
        return
    for handler in logging.getLogger("vllm").handlers:
        ours.addHandler(handler)
    if ours.level == logging.NOTSET:
        ours.setLevel(logging.INFO)
    ours.propagate = False


class LMCacheDisaggConnector(KVConnectorBase_V1):
    """Push-model PD connector: P pushes prompt KV chunks into D's pool while it prefills."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        role: KVConnectorRole,
        kv_cache_config: KVCacheConfig | None = None,
    ) -> None:
        super().__init__(vllm_config, role, kv_cache_config)  # type: ignore[arg-type]
        _route_logs_to_vllm()
        transfer_config = self._kv_transfer_config
        extra = dict(transfer_config.kv_connector_extra_config or {})
        self.config = load_config(overrides=extra)
        is_producer = bool(transfer_config.is_kv_producer)
        is_consumer = bool(transfer_config.is_kv_consumer)
        self.connector_scheduler: ConnectorScheduler | None = None
        self.connector_worker: ConnectorWorker | None = None
        self.scheduler_stats = StatsRecorder()
        use_cache = cache_enabled(self.config)
        engine_id = str(transfer_config.engine_id or "engine")
        if role == KVConnectorRole.SCHEDULER:
            loads = is_consumer or use_cache
            if loads and transfer_config.kv_load_failure_policy != "recompute":
                logger.warning(
                    "lmcache-disagg: setting kv_load_failure_policy=recompute (was %r): a failed "
                    "KV load must be recomputed, never fail the request",
                    transfer_config.kv_load_failure_policy,
                )
                transfer_config.kv_load_failure_policy = "recompute"
            planner = None
            if use_cache:
                tp_size = vllm_config.parallel_config.tensor_parallel_size
                client = LookupClient(
                    [lookup_address(engine_id, rank) for rank in range(tp_size)],
                    lookup_timeout(self.config),
                )
                planner = CachePlanner(
                    client,
                    block_size=int(vllm_config.cache_config.block_size),
                    save_decode_cache=self.config.save_decode_cache,
                    block_ids_of=self._block_ids_of,
                    stats=self.scheduler_stats,
                )
            self.connector_scheduler = ConnectorScheduler(
                self.config,
                is_producer=is_producer,
                is_consumer=is_consumer,
                block_ids_of=self._block_ids_of,
                cache=planner,
            )
        else:
            from vllm.distributed.parallel_state import (
                get_tensor_model_parallel_rank,
                get_tensor_model_parallel_world_size,
            )

            from lmcache_disagg.connector.worker import ConnectorWorker

            self.connector_worker = ConnectorWorker(
                self.config,
                model=model_id(vllm_config),
                is_producer=is_producer,
                is_consumer=is_consumer,
                tp_rank=get_tensor_model_parallel_rank(),
                tp_size=get_tensor_model_parallel_world_size(),
                use_mla=bool(vllm_config.model_config.use_mla),
                lookup_address=lookup_address(engine_id, get_tensor_model_parallel_rank())
                if use_cache
                else None,
            )

    # ==============================================================================================
    # Scheduler side (scheduler process, engine thread)
    # ==============================================================================================

    def _block_ids_of(self, req_id: str) -> list[int]:
        manager = self._kv_cache_manager
        assert manager is not None, "bind_kv_cache_manager() was not called"
        groups = manager.get_block_ids(req_id)
        if len(groups) != 1:
            raise RuntimeError("lmcache-disagg supports models with one KV cache group only")
        return list(groups[0])

    def _sched(self) -> ConnectorScheduler:
        assert self.connector_scheduler is not None, "scheduler hook called on a worker"
        return self.connector_scheduler

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        """D: how many prompt tokens beyond ``num_computed_tokens`` P pushed, loaded async.

        Caller: vLLM's scheduler (scheduler process, engine thread), for each waiting request,
        possibly several times before it is scheduled; only the latest answer counts. Returns
        ``(n, True)`` with ``n`` excluding the last prompt token (D always computes it), or
        ``(0, False)`` for requests without pushed KV of ours. Never ``None``: the answer comes
        from the request's own ``kv_transfer_params``, no remote lookup is needed.
        """
        return self._sched().get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        """After vLLM allocated blocks for ``request`` (scheduler process, once or twice).

        P: start tracking the push of the prompt. D: turn the plan made in
        ``get_num_new_matched_tokens`` into a load of ``num_external_tokens`` tokens into the
        request's blocks (a second call after the load is ignored; 0 tokens frees P's push).
        """
        self._sched().update_state_after_alloc(request, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        """Once per scheduler step: everything decided since the last step, for every worker.

        Includes, per push request scheduled this step, its block table and how far its prompt
        is computed after the step's forward; new loads; pushes to cancel or hand over; D
        transfers to free. Resets the collected state (the next step starts empty).
        """
        return self._sched().build_connector_meta(scheduler_output)

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        """Once per finished request, before vLLM frees its blocks (scheduler process).

        P: returns ``(True, d_params)`` for a completed prefill whose push started - the blocks
        stay allocated until the worker reports the request in ``finished_sending`` (push
        settled, always within ``push_deadline``) - and ``(False, d_params)`` when nothing was
        pushed (1-token prompt). An aborted prefill cancels its push: ``(False, None)``. D:
        always ``(False, None)``; a load that never started frees P's push on D.
        """
        return self._sched().request_finished(request)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        """Each step, with the workers' aggregated results: settled loads are forgotten."""
        self._sched().update_connector_output(connector_output)

    def get_external_cache_hit_sources(
        self, request: Request, num_external_tokens: int
    ) -> dict[CacheHitSource, int]:
        """Split the loaded tokens by source for vLLM's per-source prompt-token metric: P's push
        is ``p2p``, the store's RAM ``host``, its disk ``disk``, Redis ``external_unspecified``.

        Called by the scheduler right after ``update_state_after_alloc``."""
        from vllm.v1.metrics.cache_hit_source import CacheHitSource

        names = {
            "p2p": CacheHitSource.P2P,
            "l1": CacheHitSource.HOST,
            "l2": CacheHitSource.DISK,
            "l3": CacheHitSource.EXTERNAL_UNSPECIFIED,
        }
        split = self._sched().hit_sources(request, num_external_tokens)
        if not split:
            return super().get_external_cache_hit_sources(request, num_external_tokens)
        out: dict[CacheHitSource, int] = {}
        for name, tokens in split.items():
            source = names.get(name, CacheHitSource.EXTERNAL_UNSPECIFIED)
            out[source] = out.get(source, 0) + tokens
        return out

    def has_pending_push_work(self) -> bool:
        """True while decisions wait for the next step (keeps an idle engine stepping)."""
        return self.connector_scheduler is not None and self.connector_scheduler.has_pending_work()

    def get_loaded_kv_cache_group_ids(self, request: Request) -> tuple[int, ...]:
        """We write the request's own blocks of its only KV cache group."""
        return (0,)

    # ==============================================================================================
    # Worker side (each worker process, engine thread)
    # ==============================================================================================

    def _work(self) -> ConnectorWorker:
        assert self.connector_worker is not None, "worker hook called on the scheduler"
        return self.connector_worker

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Once per worker, after vLLM allocated its KV caches (worker process).

        Describes the layout (or leaves the connector inactive: everything recomputed) and
        starts D's KV listener on ``listen_port + tp_rank`` and/or P's sender.
        """
        self._work().register_kv_caches(kv_caches)

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        """Before every forward, on each worker's engine thread (the step's metadata).

        P: new pushes start their reservation now (opener thread), so it overlaps the forward;
        progress updates are recorded. D: new loads are registered, transfers freed.
        """
        super().bind_connector_metadata(connector_metadata)
        if isinstance(connector_metadata, LMCacheDisaggMetadata):
            self._work().bind(connector_metadata)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        """Loads are asynchronous and polled in get_transfer_results; nothing to start here."""
        return None

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Never: no synchronous, layer-wise loads."""
        return None

    def save_kv_layer(
        self,
        layer_name: str,
        kv_layer: torch.Tensor,
        attn_metadata: AttentionMetadata,
        **kwargs: Any,
    ) -> None:
        """Unused: P pushes chunk-wise after the forward (see wait_for_save)."""
        return None

    def wait_for_save(self) -> None:
        """After every forward: gather the chunks this step completed and start sending them."""
        self._work().after_forward()

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        """Once per step, after ``wait_for_save`` (worker engine thread; never blocks long).

        ``finished_sending``: P requests whose blocks may now be freed (push settled).
        ``finished_recving``: D loads that ended - loaded, or failed; the failed ones are also in
        ``failed_recving`` so vLLM (policy ``recompute``) recomputes them. ``finished_req_ids``
        (requests vLLM finished, e.g. aborted) end their pending loads.
        """
        sending, recving, failed = self._work().transfer_results(finished_req_ids)
        return KVConnectorTransferResults(
            finished_sending=sending, finished_recving=recving, failed_recving=failed
        )

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        """Once per step: what changed in our metrics (None when nothing did).

        The scheduler's (cache lookups) and each worker's are aggregated by vLLM.
        """
        if self.connector_worker is None:
            return self.scheduler_stats.take()
        return self.connector_worker.take_stats()

    def shutdown(self) -> None:
        """Worker process exit: cancel pushes, free loads, stop the endpoints' threads."""
        if self.connector_worker is not None:
            self.connector_worker.shutdown()
        if self.connector_scheduler is not None and self.connector_scheduler.cache is not None:
            self.connector_scheduler.cache.close()

    # ==============================================================================================
    # Metrics (API server process)
    # ==============================================================================================

    @classmethod
    def build_kv_connector_stats(
        cls, data: dict[str, Any] | None = None
    ) -> KVConnectorStats | None:
        return LMCacheDisaggStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: VllmConfig,
        metric_types: dict[type[PromMetric], type[PromMetricT]],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> KVConnectorPromMetrics | None:
        return LMCacheDisaggPromMetrics(
            vllm_config, metric_types, labelnames, per_engine_labelvalues
        )
