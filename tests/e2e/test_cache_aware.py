"""cache_aware routing on real vLLM (CPU), 1P2D: a repeated prompt goes to the D that holds its KV
and loads it from that D's own store, with no push from P; outputs equal a run without PD.

Every worker's chunk store publishes its KV events (``kv_events_endpoint``); the proxy tokenizes
with the model's tokenizer and routes with ``--policy cache_aware``.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from lmcache_disagg.vllm_server import VLLMServer, VLLMServerSpec, free_port
from tests.e2e.utils import (
    FAST_TIMEOUTS,
    Proxy,
    Result,
    Spec,
    connector_config,
    metric_sum,
    run_spec,
    scrape,
    start_servers,
    token_prompt,
    wait_for,
)

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(1800)]

BLOCK = 32  # the CPU attention backend needs a multiple of 32
MAX_TOKENS = 8
EXTERNAL = "vllm:prompt_tokens_by_source_total"
PROMPT = token_prompt(1000, 201) + token_prompt(100, 202)
OTHER = token_prompt(1000, 201) + token_prompt(150, 203)


def _spec(name: str, tokens: list[int]) -> Spec:
    return Spec(name, "completions", {"prompt": tokens, "max_tokens": MAX_TOKENS,
                                      "temperature": 0}, False, len(tokens))  # fmt: skip


def _port_pair() -> int:
    """A free port whose successor is free too (PUB and snapshot sockets)."""
    for _ in range(100):
        port = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two consecutive free ports")


def _worker(model: Path, log: Path, core: int, role: str, events_port: int) -> VLLMServer:
    config = {
        "channel": "tcp", "listen_port": free_port(), **FAST_TIMEOUTS,
        "kv_events_endpoint": f"tcp://127.0.0.1:{events_port}",
    }  # fmt: skip
    spec = VLLMServerSpec(
        model_dir=str(model), cpu_core=core, kv_transfer_config=connector_config(role, **config),
        extra_args=("--block-size", str(BLOCK), "--no-enable-prefix-caching"),
    )  # fmt: skip
    return VLLMServer(spec, log)


@dataclass
class Run:
    reference: dict[str, Result] = field(default_factory=dict)
    got: dict[str, Result] = field(default_factory=dict)
    d_requests: dict[str, dict[str, float]] = field(default_factory=dict)
    p_prompt_tokens: list[float] = field(default_factory=list)
    computed_on_d: dict[str, float] = field(default_factory=dict)
    proxy_metrics: str = ""


@pytest.fixture(scope="module")
def run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    root = tmp_path_factory.mktemp("cache-aware")
    model = str(tiny_model_dir)
    out = Run()
    plain = VLLMServer(
        VLLMServerSpec(model_dir=model, cpu_core=0, extra_args=("--block-size", str(BLOCK))),
        root / "plain.log",
    )
    try:
        plain.start()
        for name, tokens in (("prompt", PROMPT), ("other", OTHER)):
            out.reference[name] = run_spec(plain.url, model, _spec(name, tokens))
    finally:
        plain.stop()
    ports = {name: _port_pair() for name in ("p", "d0", "d1")}
    p = _worker(tiny_model_dir, root / "p.log", 0, "kv_producer", ports["p"])
    d0 = _worker(tiny_model_dir, root / "d0.log", 1, "kv_consumer", ports["d0"])
    d1 = _worker(tiny_model_dir, root / "d1.log", 1, "kv_consumer", ports["d1"])
    decodes = {"d0": d0, "d1": d1}
    proxy: Proxy | None = None
    try:
        start_servers(p, d0, d1)
        decode_flags = []
        for d in (d0, d1):
            kv = d.spec.kv_transfer_config
            assert kv is not None
            decode_flags.append(
                f"{d.address},kv=127.0.0.1:{kv['kv_connector_extra_config']['listen_port']}"
            )
        extra = ["--policy", "cache_aware", "--tokenizer", model, "--decode", decode_flags[1]]
        for name, server in (("p", p), ("d0", d0), ("d1", d1)):
            extra += ["--kv-events", f"{server.address}=tcp://127.0.0.1:{ports[name]}"]
        proxy = Proxy(p.address, decode_flags[0], root / "proxy.log", *extra).wait_ready()

        def proxy_metric(name: str, **labels: str) -> float:
            text = httpx.get(proxy.url + "/metrics", timeout=10).text  # type: ignore[union-attr]
            return metric_sum(text, name, **labels)

        assert wait_for(
            lambda: proxy_metric("lmcache_proxy_kv_event_sources", state="synced") == 3, 30
        )

        def send(key: str, name: str, tokens: list[int]) -> None:
            before = {n: scrape(s) for n, s in decodes.items()}
            p_before = metric_sum(scrape(p), "vllm:prompt_tokens_total")
            out.got[key] = run_spec(proxy.url, model, _spec(name, tokens))  # type: ignore[union-attr]

            def accounted() -> bool:  # vLLM books every prompt token by source after the step
                return sum(
                    metric_sum(scrape(s), EXTERNAL) - metric_sum(before[n], EXTERNAL)
                    for n, s in decodes.items()
                ) >= len(tokens)

            assert wait_for(accounted, 30)
            after = {n: scrape(s) for n, s in decodes.items()}
            out.d_requests[key] = {
                n: metric_sum(after[n], "vllm:request_success_total")
                - metric_sum(before[n], "vllm:request_success_total")
                for n in decodes
            }
            out.computed_on_d[key] = sum(
                metric_sum(after[n], EXTERNAL, source="local_compute")
                - metric_sum(before[n], EXTERNAL, source="local_compute")
                for n in decodes
            )
            out.p_prompt_tokens.append(metric_sum(scrape(p), "vllm:prompt_tokens_total") - p_before)

        send("first", "prompt", PROMPT)
        # The D that served it stores what it received and publishes it; wait for the index.
        holder = decodes[max(decodes, key=lambda n: out.d_requests["first"][n])]
        assert wait_for(
            lambda: (
                proxy_metric("lmcache_proxy_kv_index_worker_keys", worker=holder.address)
                >= len(PROMPT) // 256
            ),
            30,
        )
        send("second", "prompt", PROMPT)
        send("other", "other", OTHER)
        out.proxy_metrics = httpx.get(proxy.url + "/metrics", timeout=10).text
    finally:
        if proxy is not None:
            proxy.stop()
        for server in (p, d0, d1):
            server.stop()
    yield out


def test_outputs_equal_a_run_without_pd(run: Run) -> None:
    assert run.got["first"].key() == run.reference["prompt"].key()
    assert run.got["second"].key() == run.reference["prompt"].key()
    assert run.got["other"].key() == run.reference["other"].key()


def test_second_request_goes_to_the_d_holding_it_and_loads_locally_without_a_push(run: Run) -> None:
    first = run.d_requests["first"]
    holder = max(first, key=lambda n: first[n])
    assert first[holder] == 1
    assert run.d_requests["second"][holder] == 1, "routed to the D that holds the prompt"
    assert run.p_prompt_tokens[1] == 0, "P was skipped: no prefill, no push"
    # D loaded all but the last block from its own store (it always computes the last token).
    assert 1 <= run.computed_on_d["second"] <= BLOCK
    assert metric_sum(run.proxy_metrics, "lmcache_proxy_cache_aware_decisions_total",
                      reason="cached_on_decode") == 1  # fmt: skip
    # The shared 1,000-token prefix also sends the other prompt to the same D (through P).
    assert run.d_requests["other"][holder] == 1
    assert run.p_prompt_tokens[2] > 0
