"""``lmcache-disagg demo``: a local CPU 1P1D cluster on the tiny model.

It builds the offline tiny model, starts a prefill worker (P) and a decode worker (D) - real vLLM
(CPU) with the lmcache-disagg connector, pinned to one core each - and the proxy, all on free
loopback ports. It sends one completion and one streamed chat through the proxy, prints the answers
and a table of what happened on D (prompt tokens, tokens loaded from P vs computed, time to first
token), then runs ``lmcache-disagg check`` against the running cluster and shuts everything down.

``--prometheus`` also starts a real Prometheus (the ``prometheus`` binary) scraping P, D and the
proxy, and runs every query of the Grafana dashboard against it once the requests are done.

``--single`` runs one plain vLLM worker instead (no PD), as a smoke test of the installation.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from lmcache_disagg.bench.cluster import Proc, start_proxy, wait_http
from lmcache_disagg.tiny_model import TinyModelSpec, build_tiny_model
from lmcache_disagg.vllm_server import VLLMServer, VLLMServerSpec, free_port

if TYPE_CHECKING:
    from lmcache_disagg.prometheus import PrometheusServer

__all__ = ["main"]

COMPLETION_PROMPT = (
    "In the beginning the river ran quietly through the valley, past farms, mills and small "
    "towns. Children played by the water while their parents worked the fields. " * 12
)
CHAT_MESSAGES = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Explain, in a few words, why prefill and decode are split. " * 10},
]
SOURCE_METRIC = re.compile(
    r'^vllm:prompt_tokens_by_source_total\{[^}]*source="(\w+)"[^}]*\}\s+(\S+)', re.M
)


def connector_config(role: str, listen_port: int) -> dict[str, Any]:
    """The ``--kv-transfer-config`` for one demo worker (TCP channel on loopback)."""
    return {
        "kv_connector": "LMCacheDisaggConnector",
        "kv_connector_module_path": "lmcache_disagg.connector",
        "kv_role": role,
        # A failed KV load is recomputed, never turned into a failed request.
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"channel": "tcp", "listen_port": listen_port},
    }


def prompt_tokens_by_source(server: VLLMServer) -> dict[str, float]:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    totals: dict[str, float] = {}
    for source, value in SOURCE_METRIC.findall(text):
        totals[source] = totals.get(source, 0.0) + float(value)
    return totals


@dataclass
class Answer:
    kind: str
    text: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    ttft_s: float


def _completion(base_url: str, model: str) -> Answer:
    body = {"model": model, "prompt": COMPLETION_PROMPT, "max_tokens": 24, "temperature": 0}
    start = time.perf_counter()
    response = httpx.post(base_url + "/v1/completions", json=body, timeout=120)
    elapsed = time.perf_counter() - start
    response.raise_for_status()
    payload = response.json()
    usage = payload.get("usage") or {}
    details = usage.get("prompt_tokens_details") or {}
    return Answer(
        "completion",
        payload["choices"][0]["text"],
        usage.get("prompt_tokens", 0),
        usage.get("completion_tokens", 0),
        details.get("cached_tokens") or 0,
        elapsed,
    )


def _streamed_chat(base_url: str, model: str) -> Answer:
    body = {
        "model": model,
        "messages": CHAT_MESSAGES,
        "max_tokens": 24,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    ttft = 0.0
    pieces: list[str] = []
    usage: dict[str, Any] = {}
    with httpx.stream(
        "POST", base_url + "/v1/chat/completions", json=body, timeout=120
    ) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: ") :])
            for choice in event.get("choices") or []:
                delta = choice.get("delta", {}).get("content")
                if delta:
                    ttft = ttft or time.perf_counter() - start
                    pieces.append(delta)
            usage = event.get("usage") or usage
    details = usage.get("prompt_tokens_details") or {}
    return Answer(
        "streamed chat",
        "".join(pieces),
        usage.get("prompt_tokens", 0),
        usage.get("completion_tokens", 0),
        details.get("cached_tokens") or 0,
        ttft,
    )


def _print_answers(answers: list[Answer], loaded: float, computed: float) -> None:
    for answer in answers:
        print(f"\n[{answer.kind}] {answer.text!r}")
    print()
    header = (
        f"{'request':<15} {'prompt tok':>10} {'cached tok':>10} {'completion':>10} {'TTFT ms':>9}"
    )
    print(header)
    print("-" * len(header))
    for answer in answers:
        print(
            f"{answer.kind:<15} {answer.prompt_tokens:>10} {answer.cached_tokens:>10} "
            f"{answer.completion_tokens:>10} {answer.ttft_s * 1000:>9.1f}"
        )
    print(
        f"\nOn D (vLLM's own counters): {loaded:.0f} prompt tokens loaded from P, "
        f"{computed:.0f} computed locally (the last token of each prompt is always computed)."
    )


def run_single(model_dir: Path, work: Path) -> int:
    spec = VLLMServerSpec(model_dir=str(model_dir), cpu_core=0)
    with VLLMServer(spec, work / "vllm.log") as server:
        answer = _completion(server.url, str(model_dir))
    print(
        f"[completion] {answer.text!r}\n({answer.prompt_tokens} prompt tokens, {answer.ttft_s * 1000:.0f} ms)"
    )
    return 0


def _print_check(prefill: VLLMServer, decode: str) -> int:
    from lmcache_disagg.check import check
    from lmcache_disagg.config import load_config

    table, problems = check(load_config(environ={}), [prefill.address], [decode])
    print("\n[lmcache-disagg check]\n" + table)
    for problem in problems:
        print(problem)
    if not problems:
        print("ok: the cluster is wired correctly")
    return len(problems)


def _print_dashboard(prometheus: PrometheusServer) -> None:
    from lmcache_disagg.prometheus import dashboard_queries

    queries = dashboard_queries()
    answered, pending = prometheus.answered(queries, deadline_s=10)
    print(
        f"\n[dashboard] Prometheus {prometheus.url} answered {len(answered)} of {len(queries)} "
        "dashboard queries"
    )
    if pending:
        # A healthy demo has no retries, failures or evictions: those panels stay empty.
        print("no data (nothing of that kind happened):", "; ".join(sorted(set(pending.values()))))


def run_pd(model_dir: Path, work: Path, with_prometheus: bool = False) -> int:
    model = str(model_dir)
    kv_port = free_port()
    decode = VLLMServer(
        VLLMServerSpec(
            model, cpu_core=1, kv_transfer_config=connector_config("kv_consumer", kv_port)
        ),
        work / "decode.log",
    )
    prefill = VLLMServer(
        VLLMServerSpec(
            model, cpu_core=0, kv_transfer_config=connector_config("kv_producer", free_port())
        ),
        work / "prefill.log",
    )
    proxy: Proc | None = None
    prometheus: PrometheusServer | None = None
    try:
        print("starting P and D (real vLLM on the CPU, ~30-60 s) ...", flush=True)
        with ThreadPoolExecutor(2) as pool:
            for future in [pool.submit(decode.start), pool.submit(prefill.start)]:
                future.result()
        # The proxy runs in its own process: it must not share one with torch/vLLM.
        proxy_port = free_port()
        proxy_url = f"http://127.0.0.1:{proxy_port}"
        proxy = start_proxy(
            proxy_port, [prefill.address], [f"{decode.address},kv=127.0.0.1:{kv_port}"], work
        )
        wait_http(proxy_url + "/ready", timeout=60, proc=proxy)
        print(f"P {prefill.url}  D {decode.url} (KV 127.0.0.1:{kv_port})  proxy {proxy_url}")
        if with_prometheus:
            from lmcache_disagg.prometheus import PrometheusServer

            targets = {"proxy": f"127.0.0.1:{proxy_port}", "prefill": prefill.address}
            targets["decode"] = decode.address
            prometheus = PrometheusServer(targets, work / "prometheus").wait_ready()
            prometheus.wait_targets_up()
        before = prompt_tokens_by_source(decode)
        answers = [_completion(proxy_url, model), _streamed_chat(proxy_url, model)]
        after = prompt_tokens_by_source(decode)
        loaded = after.get("external_kv_transfer", 0.0) - before.get("external_kv_transfer", 0.0)
        computed = after.get("local_compute", 0.0) - before.get("local_compute", 0.0)
        _print_answers(answers, loaded, computed)
        problems = _print_check(prefill, f"{decode.address},kv=127.0.0.1:{kv_port}")
        if prometheus is not None:
            _print_dashboard(prometheus)
        return 1 if problems else 0
    finally:
        if prometheus is not None:
            prometheus.stop()
        if proxy is not None:
            proxy.stop()
        prefill.stop()
        decode.stop()
        print(f"\nlogs: {work}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lmcache-disagg demo", description=__doc__)
    parser.add_argument("--single", action="store_true", help="one plain vLLM worker, no PD")
    parser.add_argument(
        "--model-dir", default=".models/tiny-f32", help="where the tiny model is built"
    )
    parser.add_argument(
        "--prometheus",
        action="store_true",
        help="also run Prometheus against the cluster and the dashboard's queries against it",
    )
    args = parser.parse_args(argv)
    print("building the tiny offline model ...", flush=True)
    model_dir = build_tiny_model(args.model_dir, TinyModelSpec(dtype="float32"))
    work = Path(tempfile.mkdtemp(prefix="lmcache-disagg-demo-"))
    return run_single(model_dir, work) if args.single else run_pd(model_dir, work, args.prometheus)
