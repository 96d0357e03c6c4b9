"""``lmcache-disagg bench e2e``: monolithic vLLM vs our PD vs stock NixlConnector behind our proxy.

All three setups run in ONE invocation, one after the other (never two setups at once, so they
do not compete for the CPUs), on the same larger random model and the same 1k-4k-token prompts (fresh random
token ids per request, so no setup gets a prefix-cache hit). Per setup it reports the median
time to first token (streaming) and total latency, and for the PD setups how many prompt tokens D
computed itself (vLLM's ``prompt_tokens_by_source_total{source="local_compute"}``; ideally 1 per
request). Ratios against stock NixlConnector are the figures to quote; absolute times are noisy.

``--json`` prints one JSON object as the last line of stdout.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from lmcache_disagg.bench.streaming import stream_completion
from lmcache_disagg.tiny_model import TinyModelSpec, build_tiny_model
from lmcache_disagg.vllm_server import VLLMServer, VLLMServerSpec, free_port

__all__ = ["main"]

_SOURCE = re.compile(
    r'^vllm:prompt_tokens_by_source_total\{[^}]*source="(\w+)"[^}]*\}\s+(\S+)', re.M
)


@dataclass
class SetupResult:
    name: str
    ttft_s: list[float] = field(default_factory=list)
    total_s: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    d_computed_tokens: float | None = None
    d_loaded_tokens: float | None = None
    outputs: list[list[int]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "ttft_median_s": round(statistics.median(self.ttft_s), 4),
            "total_median_s": round(statistics.median(self.total_s), 4),
            "requests": len(self.ttft_s),
            "prompt_tokens": self.prompt_tokens,
            "d_computed_prompt_tokens": self.d_computed_tokens,
            "d_loaded_prompt_tokens": self.d_loaded_tokens,
        }


def _sources(server: VLLMServer) -> dict[str, float]:
    totals: dict[str, float] = {}
    text = httpx.get(server.url + "/metrics", timeout=10).text
    for source, value in _SOURCE.findall(text):
        totals[source] = totals.get(source, 0.0) + float(value)
    return totals


def _stream_once(
    url: str, model: str, prompt: list[int], max_tokens: int
) -> tuple[float, float, list[int]]:
    result = stream_completion(url, model, prompt, max_tokens, timeout_s=600)
    return result.ttft_s, result.total_s, result.token_ids


class _Proxy:
    def __init__(self, prefill: str, decode: str, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = log.open("wb")
        self._process = subprocess.Popen(
            [
                sys.executable, "-m", "lmcache_disagg.proxy.cli",
                "--host", "127.0.0.1", "--port", str(self.port),
                "--prefill", prefill, "--decode", decode,
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"proxy exited; see {log}")
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError("proxy not ready")

    def stop(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=10)
        self._log.close()


def _ours(role: str, listen_port: int) -> dict[str, Any]:
    return {
        "kv_connector": "LMCacheDisaggConnector",
        "kv_connector_module_path": "lmcache_disagg.connector",
        "kv_role": role,
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {
            "channel": "tcp",
            "listen_port": listen_port,
            "pool_size": "1GiB",
            "send_buffer_size": "512MiB",
        },
    }


def _stock() -> dict[str, Any]:
    return {"kv_connector": "NixlConnector", "kv_role": "kv_both"}


def _run_requests(
    result: SetupResult, url: str, model: str, prompts: list[list[int]], max_tokens: int
) -> None:
    for prompt in prompts:
        ttft, total, tokens = _stream_once(url, model, prompt, max_tokens)
        result.ttft_s.append(ttft)
        result.total_s.append(total)
        result.prompt_tokens += len(prompt)
        result.outputs.append(tokens)


def _spec(
    model: Path, core: int, kv: dict[str, Any] | None, env: dict[str, str] | None = None
) -> VLLMServerSpec:
    return VLLMServerSpec(
        model_dir=str(model),
        cpu_core=core,
        kv_transfer_config=kv,
        kv_cache_gib=2,
        max_model_len=4096,
        env=env or {},
    )


def _monolithic(model: Path, work: Path, prompts: list[list[int]], max_tokens: int) -> SetupResult:
    result = SetupResult("monolithic")
    with VLLMServer(_spec(model, 0, None), work / "mono.log") as server:
        _stream_once(server.url, str(model), [9, 10, 11] * 50, 2)  # warm-up, not measured
        _run_requests(result, server.url, str(model), prompts, max_tokens)
    return result


def _pd(
    name: str,
    model: Path,
    work: Path,
    prompts: list[list[int]],
    max_tokens: int,
    make: Callable[[str], tuple[VLLMServerSpec, str]],
) -> SetupResult:
    result = SetupResult(name)
    d_spec, d_target = make("decode")
    p_spec, _ = make("prefill")
    decode = VLLMServer(d_spec, work / f"{name}-d.log")
    prefill = VLLMServer(p_spec, work / f"{name}-p.log")
    proxy: _Proxy | None = None
    try:
        decode.start()
        prefill.start()
        proxy = _Proxy(
            prefill.address, d_target.format(decode=decode.address), work / f"{name}-proxy.log"
        )
        _stream_once(proxy.url, str(model), [9, 10, 11] * 50, 2)  # warm-up, not measured
        before = _sources(decode)
        _run_requests(result, proxy.url, str(model), prompts, max_tokens)
        after = _sources(decode)
        result.d_computed_tokens = after.get("local_compute", 0) - before.get("local_compute", 0)
        result.d_loaded_tokens = after.get("external_kv_transfer", 0) - before.get(
            "external_kv_transfer", 0
        )
    finally:
        if proxy is not None:
            proxy.stop()
        prefill.stop()
        decode.stop()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lmcache-disagg bench e2e", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--prompt-lengths", default="1024,2048,3072,4000")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--model-dir", default=None, help="default .models/bench-<layers>x<hidden>")
    parser.add_argument(
        "--setups", default="monolithic,ours,stock_nixl", help="comma list of setups to run"
    )
    args = parser.parse_args(argv)

    heads = max(1, args.hidden // 64)
    spec = TinyModelSpec(
        layers=args.layers,
        hidden=args.hidden,
        intermediate=2 * args.hidden,
        heads=heads,
        kv_heads=max(1, heads // 2),
        vocab=512,
        dtype="float32",
    )
    model = build_tiny_model(args.model_dir or f".models/bench-{args.layers}x{args.hidden}", spec)
    lengths = [int(x) for x in args.prompt_lengths.split(",") if x]
    rng = random.Random(2026)
    setups = [s.strip() for s in args.setups.split(",") if s.strip()]
    # The same distinct random prompts for every setup: each setup has its own servers, so no
    # prefix-cache reuse across setups, and the outputs can be compared token by token.
    prompts = [
        [rng.randrange(3, 512) for _ in range(n)] for _ in range(args.repeats) for n in lengths
    ]
    work = Path(tempfile.mkdtemp(prefix="lmcache-disagg-bench-e2e-"))
    results: dict[str, SetupResult] = {}
    for setup in setups:
        print(f"[{setup}] running {len(prompts)} prompts of {lengths} tokens ...", flush=True)
        if setup == "monolithic":
            results[setup] = _monolithic(model, work, prompts, args.max_tokens)
        elif setup == "ours":
            kv_port = free_port()

            def make_ours(side: str, kv_port: int = kv_port) -> tuple[VLLMServerSpec, str]:
                if side == "decode":
                    return _spec(
                        model, 1, _ours("kv_consumer", kv_port)
                    ), f"{{decode}},kv=127.0.0.1:{kv_port}"
                return _spec(model, 0, _ours("kv_producer", free_port())), ""

            results[setup] = _pd(setup, model, work, prompts, args.max_tokens, make_ours)
        elif setup == "stock_nixl":

            def make_stock(side: str) -> tuple[VLLMServerSpec, str]:
                env = {"VLLM_NIXL_SIDE_CHANNEL_PORT": str(free_port())}
                core = 1 if side == "decode" else 0
                return _spec(model, core, _stock(), env), "{decode}"

            results[setup] = _pd(setup, model, work, prompts, args.max_tokens, make_stock)
        else:
            parser.error(f"unknown setup {setup!r}")

    summary: dict[str, Any] = {name: r.summary() for name, r in results.items()}
    ratios: dict[str, float] = {}
    if "ours" in results and "stock_nixl" in results:
        ours, stock = results["ours"], results["stock_nixl"]
        ratios["ttft_ours_over_stock_nixl"] = round(
            statistics.median(ours.ttft_s) / statistics.median(stock.ttft_s), 3
        )
        ratios["total_ours_over_stock_nixl"] = round(
            statistics.median(ours.total_s) / statistics.median(stock.total_s), 3
        )
    if "ours" in results and "monolithic" in results:
        ratios["ttft_ours_over_monolithic"] = round(
            statistics.median(results["ours"].ttft_s)
            / statistics.median(results["monolithic"].ttft_s),
            3,
        )
        for name in ("ours", "stock_nixl"):
            if name in results:
                same = results[name].outputs == results["monolithic"].outputs
                summary[name]["identical_to_monolithic"] = same
    summary["ratios"] = ratios
    summary["model"] = asdict(spec)
    summary["prompt_lengths"] = lengths
    summary["logs"] = str(work)

    header = (
        f"{'setup':<12} {'TTFT med s':>10} {'total med s':>11} {'D computed':>10} {'D loaded':>9}"
    )
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        s = r.summary()
        computed = (
            "-" if s["d_computed_prompt_tokens"] is None else f"{s['d_computed_prompt_tokens']:.0f}"
        )
        loaded = (
            "-" if s["d_loaded_prompt_tokens"] is None else f"{s['d_loaded_prompt_tokens']:.0f}"
        )
        print(
            f"{name:<12} {s['ttft_median_s']:>10.3f} {s['total_median_s']:>11.3f} {computed:>10} {loaded:>9}"
        )
    for key, value in ratios.items():
        print(f"{key}: {value}")
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
