"""Proxy -> P -> D on real vLLM (CPU) with our connector, over the TCP and the NIXL channel.

For each channel one P/D pair serves every spec of :func:`tests.e2e.utils.all_specs` (>= 20
requests: lengths 1..1500 tokens, completions and chat, streaming and not, n=2 seeded); the
outputs must be token-identical to the monolithic baseline, D must have LOADED the prompt KV
(vLLM's own counter and ours), the KV D loaded must be bitwise what P gathered, and every pool
must drain to 0.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.utils import (
    Pair,
    Proxy,
    Result,
    all_specs,
    checksums,
    compare,
    metric_labels,
    metric_sum,
    run_all,
    run_spec,
    scrape,
    start_pair,
    wait_for,
)

pytestmark = pytest.mark.timeout(900)


@dataclass
class PDRun:
    pair: Pair
    proxy: Proxy
    channel: str
    results: dict[str, Result]
    before_d: str
    after_d: str
    after_p: str


@pytest.fixture(scope="module", params=["tcp", "nixl"])
def pd_run(
    request: pytest.FixtureRequest,
    baseline_results: dict[str, Result],
    tiny_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[PDRun]:
    channel = request.param
    log_dir = tmp_path_factory.mktemp(f"pd-{channel}")
    # P prefills in steps of 384 tokens (chunked prefill), so long prompts are pushed chunk by
    # chunk while the rest is still being computed.
    pair = start_pair(tiny_model_dir, log_dir, channel)
    proxy = Proxy(
        pair.prefill.address, f"{pair.decode.address},kv={pair.kv}", log_dir / "proxy.log"
    )
    try:
        proxy.wait_ready()
        before_d = scrape(pair.decode)
        results = run_all(proxy.url, str(tiny_model_dir), all_specs())
        yield PDRun(
            pair, proxy, channel, results, before_d, scrape(pair.decode), scrape(pair.prefill)
        )
    finally:
        proxy.stop()
        pair.stop()


def test_outputs_are_token_identical(pd_run: PDRun, baseline_results: dict[str, Result]) -> None:
    assert len(baseline_results) >= 20
    assert compare(baseline_results, pd_run.results) == []


def test_prompt_kv_was_loaded_not_recomputed(pd_run: PDRun) -> None:
    specs = all_specs()
    engine_requests = sum(int(spec.body.get("n", 1)) for spec in specs)
    before, after = pd_run.before_d, pd_run.after_d
    name = "vllm:prompt_tokens_by_source_total"
    computed = metric_sum(after, name, source="local_compute") - metric_sum(
        before, name, source="local_compute"
    )
    transferred = metric_sum(after, name, source="external_kv_transfer") - metric_sum(
        before, name, source="external_kv_transfer"
    )
    # vLLM's own counter: D computed at most the last prompt token of each request.
    assert 0 < computed <= engine_requests, (computed, transferred)
    # Ours agree: every prompt token but the last was loaded; nothing fell back.
    prompt_tokens = sum(
        int(r.usage.get("prompt_tokens", 0)) * len(r.choices) for r in pd_run.results.values()
    )
    loaded = metric_sum(after, "lmcache_disagg_tokens_loaded_total") - metric_sum(
        before, "lmcache_disagg_tokens_loaded_total"
    )
    cached = metric_sum(after, name, source="local_cache_hit") - metric_sum(
        before, name, source="local_cache_hit"
    )
    assert loaded == transferred
    # D's prefix cache may serve a sibling's (n=2) blocks; the rest of each prompt was loaded.
    assert loaded + cached + computed == prompt_tokens
    assert loaded > prompt_tokens / 2
    assert metric_labels(after, "lmcache_disagg_fallbacks_total", "reason") == {}
    assert metric_sum(after, "lmcache_disagg_tokens_recomputed_total") == 0
    # n=2 children load the same push twice, so P pushed less than D loaded, but not much less.
    assert metric_sum(pd_run.after_p, "lmcache_disagg_tokens_pushed_total") >= loaded * 0.8


def test_loaded_kv_is_bitwise_what_p_computed(pd_run: PDRun) -> None:
    pushed = checksums(pd_run.pair.prefill.log_path, "P")
    loaded = checksums(pd_run.pair.decode.log_path, "D")
    # Every full-range chunk D loaded, re-read from D's paged cache, equals P's gathered bytes.
    assert len(loaded) >= 20
    mismatched = {
        key: (pushed.get(key), digest)
        for key, digest in loaded.items()
        if pushed.get(key) != digest
    }
    assert mismatched == {}


def test_pools_drain_to_zero(pd_run: PDRun, tiny_model_dir: Path) -> None:
    # Gauges are reported on engine steps: one tiny direct request makes each engine step once.
    poke = all_specs()[0]

    def drained() -> bool:
        run_spec(pd_run.pair.decode.url, str(tiny_model_dir), poke)
        run_spec(pd_run.pair.prefill.url, str(tiny_model_dir), poke)
        d, p = scrape(pd_run.pair.decode), scrape(pd_run.pair.prefill)
        return (
            metric_sum(d, "lmcache_disagg_pool_pages_used") == 0
            and metric_sum(d, "lmcache_disagg_pending_loads") == 0
            and metric_sum(p, "lmcache_disagg_send_pages_used") == 0
            and metric_sum(p, "lmcache_disagg_pending_pushes") == 0
        )

    assert wait_for(drained, timeout=30, interval=1.0)
    d = scrape(pd_run.pair.decode)
    assert metric_sum(d, "lmcache_disagg_pool_pages_total") > 0
