"""bf16 KV on real vLLM (CPU): the connector is active and cached output is token-identical.

vLLM's CPU attention writes bf16 caches with ``block_size % 32 == 0`` in the ``amx`` ISA's tile
layout on Intel AMX hosts (the ``cpu_amx`` kind) and in the ``vec`` layout elsewhere; the
connector must follow whichever this host uses. One ``kv_both`` worker in bf16 (vLLM's prefix
caching off, so reuse can only come from our L1) serves two prompts over a shared prefix and a
repeat; a plain bf16 vLLM gives the reference. The second prompt loads the prefix, every output
equals the plain run's, and pins, leases and pools drain to zero.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

from lmcache_disagg.vllm_server import VLLMServer, VLLMServerSpec, free_port
from tests.e2e.test_cache import Sent, drain, send, spec_of
from tests.e2e.utils import (
    FAST_TIMEOUTS,
    Result,
    connector_config,
    metric_sum,
    run_spec,
    token_prompt,
)

pytestmark = pytest.mark.timeout(900)

BLOCK = 32
ARGS = ("--block-size", str(BLOCK), "--no-enable-prefix-caching")
PREFIX = token_prompt(640, 201)
PROMPTS = {
    "a": PREFIX + token_prompt(90, 202),
    "b": PREFIX + token_prompt(150, 203),
    "repeat": token_prompt(500, 204),
}


@dataclass
class Bf16Run:
    reference: dict[str, Result] = field(default_factory=dict)
    sent: dict[str, Sent] = field(default_factory=dict)
    drained: bool = False
    metrics: str = ""


@pytest.fixture(scope="module")
def bf16_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bf16Run]:
    root = tmp_path_factory.mktemp("bf16")
    model = str(tiny_model_dir)
    run = Bf16Run()
    spec = {"model_dir": model, "cpu_core": 0, "dtype": "bfloat16", "extra_args": ARGS}
    plain = VLLMServer(VLLMServerSpec(**spec), root / "plain.log")  # type: ignore[arg-type]
    try:
        plain.start()
        for name, tokens in PROMPTS.items():
            run.reference[name] = run_spec(plain.url, model, spec_of(name, tokens))
    finally:
        plain.stop()
    config = connector_config("kv_both", channel="tcp", listen_port=free_port(), **FAST_TIMEOUTS)
    cached = VLLMServer(
        VLLMServerSpec(**spec, kv_transfer_config=config),  # type: ignore[arg-type]
        root / "cached.log",
    )
    try:
        cached.start()
        for name in ("a", "b", "repeat"):
            run.sent[name] = send(cached, model, name, PROMPTS[name])
        run.sent["repeat-again"] = send(cached, model, "repeat", PROMPTS["repeat"])
        run.drained, run.metrics = drain(cached, model)
    finally:
        cached.stop()
    yield run


def test_this_host_picks_a_layout_the_connector_knows(tiny_model_dir: Path) -> None:
    config = json.loads((tiny_model_dir / "config.json").read_text())
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    assert _get_attn_isa(torch.bfloat16, BLOCK, head_dim) in ("amx", "vec", "vec16")


def test_a_shared_prefix_is_loaded_and_output_is_identical(bf16_run: Bf16Run) -> None:
    first, second = bf16_run.sent["a"], bf16_run.sent["b"]
    assert first.external == 0
    assert len(PREFIX) - BLOCK <= second.external <= len(PREFIX)
    assert second.local_compute == len(PROMPTS["b"]) - second.external
    for name in ("a", "b"):
        assert bf16_run.sent[name].result.key() == bf16_run.reference[name].key(), name
    assert metric_sum(bf16_run.metrics, "lmcache_disagg_cache_hits_total", tier="l1") > 0


def test_a_repeat_loads_all_but_the_last_token(bf16_run: Bf16Run) -> None:
    again = bf16_run.sent["repeat-again"]
    assert again.external == len(PROMPTS["repeat"]) - 1
    assert again.result.key() == bf16_run.reference["repeat"].key()
    assert bf16_run.sent["repeat"].result.key() == bf16_run.reference["repeat"].key()


def test_pins_leases_and_pools_drain_to_zero(bf16_run: Bf16Run) -> None:
    assert bf16_run.drained
