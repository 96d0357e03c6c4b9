"""Compatibility: our proxy drives STOCK vLLM NixlConnector P and D (CPU, DRAM, pull model).

The proxy is connector-agnostic: it sends P the stock fields (``do_remote_decode`` ...) next to
ours, forwards P's ``kv_transfer_params`` to D verbatim, and the output must be identical.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lmcache_disagg.vllm_server import VLLMServer, VLLMServerSpec, free_port
from tests.e2e.utils import Proxy, Result, all_specs, compare, metric_sum, run_spec, scrape

pytestmark = pytest.mark.timeout(900)

COMPAT_SPECS = (
    "cmpl-15-plain",
    "cmpl-17-stream",
    "cmpl-256-plain",
    "cmpl-257-stream",
    "cmpl-1000-plain",
    "cmpl-1500-stream",
    "chat-40-plain",
    "chat-300-stream",
)


def _stock(model: Path, log: Path, core: int) -> VLLMServer:
    spec = VLLMServerSpec(
        model_dir=str(model),
        cpu_core=core,
        kv_transfer_config={"kv_connector": "NixlConnector", "kv_role": "kv_both"},
        env={"VLLM_NIXL_SIDE_CHANNEL_PORT": str(free_port())},
    )
    return VLLMServer(spec, log)


def test_proxy_drives_stock_nixl_connector_to_identical_output(
    baseline_results: dict[str, Result], tiny_model_dir: Path, tmp_path: Path
) -> None:
    decode = _stock(tiny_model_dir, tmp_path / "stock-d.log", 1)
    prefill = _stock(tiny_model_dir, tmp_path / "stock-p.log", 0)
    try:
        decode.start()
        prefill.start()
        before = scrape(decode)
        with Proxy(prefill.address, decode.address, tmp_path / "proxy.log") as proxy:
            specs = [spec for spec in all_specs() if spec.name in COMPAT_SPECS]
            got = {spec.name: run_spec(proxy.url, str(tiny_model_dir), spec) for spec in specs}
        after = scrape(decode)
    finally:
        prefill.stop()
        decode.stop()
    assert compare({name: baseline_results[name] for name in COMPAT_SPECS}, got) == []
    # The stock connector really transferred KV (vLLM's own counter on D).
    name = "vllm:prompt_tokens_by_source_total"
    transferred = metric_sum(after, name, source="external_kv_transfer") - metric_sum(
        before, name, source="external_kv_transfer"
    )
    assert transferred > 0
