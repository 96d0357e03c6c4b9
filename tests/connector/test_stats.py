"""Connector metrics travel vLLM's route: worker recorder -> stats payload -> frontend Prometheus."""

from __future__ import annotations

from types import SimpleNamespace

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from lmcache_disagg.connector.stats import (
    LMCacheDisaggPromMetrics,
    LMCacheDisaggStats,
    StatsRecorder,
)


def test_recorder_reports_only_changes() -> None:
    rec = StatsRecorder()
    assert rec.take() is None
    rec.count("tokens_loaded", 255)
    rec.count("fallbacks", reason="deadline")
    rec.observe("load_wait_seconds", 0.25)
    rec.gauge("pool_pages_used", 3)
    stats = rec.take()
    assert stats is not None
    assert stats.data == {
        "c:tokens_loaded": 255,
        "c:fallbacks:deadline": 1,
        "h:load_wait_seconds": [0.25],
        "g:pool_pages_used": 3,
    }
    assert rec.take() is None  # nothing changed
    rec.gauge("pool_pages_used", 0)
    assert rec.take() == LMCacheDisaggStats(data={"g:pool_pages_used": 0})


def test_ranks_aggregate() -> None:
    a = LMCacheDisaggStats(data={"c:loads": 1, "h:transfer_gbps": [1.0], "g:pending_loads": 2})
    b = LMCacheDisaggStats(data={"c:loads": 2, "h:transfer_gbps": [3.0], "g:pending_loads": 1})
    merged = a.aggregate(b)
    assert merged.data == {"c:loads": 3, "h:transfer_gbps": [1.0, 3.0], "g:pending_loads": 3}
    assert merged.reduce() == {"loads": 3, "transfer_gbps_avg": 2.0, "pending_loads": 3}
    assert not merged.is_empty()


def _registry_classes(registry: CollectorRegistry) -> dict[type, type]:
    def bind(cls: type) -> type:
        class Bound(cls):  # type: ignore[misc, valid-type]
            def __init__(self, *args: object, **kwargs: object) -> None:
                kwargs.pop("multiprocess_mode", None)
                super().__init__(*args, registry=registry, **kwargs)

        return Bound

    return {Counter: bind(Counter), Gauge: bind(Gauge), Histogram: bind(Histogram)}


def test_frontend_series() -> None:
    registry = CollectorRegistry()
    vllm_config = SimpleNamespace(kv_transfer_config=None)
    prom = LMCacheDisaggPromMetrics(
        vllm_config,  # type: ignore[arg-type]
        _registry_classes(registry),  # type: ignore[arg-type]
        ["model_name", "engine"],
        {0: ["m", "0"]},
    )
    prom.observe(
        {
            "c:tokens_loaded": 100,
            "c:fallbacks:unknown_transfer": 2,
            "g:pool_pages_used": 4,
            "h:load_wait_seconds": [0.01, 0.02],
            "c:not_a_metric": 1,
        }
    )
    prom.observe({"c:tokens_loaded": 28, "g:pool_pages_used": 0})
    text = generate_latest(registry).decode()
    assert 'lmcache_disagg_tokens_loaded_total{engine="0",model_name="m"} 128.0' in text
    assert (
        'lmcache_disagg_fallbacks_total{engine="0",model_name="m",reason="unknown_transfer"} 2.0'
        in text
    )
    assert 'lmcache_disagg_pool_pages_used{engine="0",model_name="m"} 0.0' in text
    assert 'lmcache_disagg_load_wait_seconds_count{engine="0",model_name="m"} 2.0' in text
