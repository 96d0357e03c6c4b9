"""``lmcache-disagg bench cache``: TTFT cold vs warm from each tier of the chunk store.

One invocation, one vLLM server at a time (``kv_both``, vLLM's own prefix caching off so every
reuse is the store's), all on the same benchmark model and the same random token prompts:

* **off**: the connector with every tier off - cold TTFT without storing (the baseline of the
  storing overhead) and the multi-round chat without the cache;
* **on**: RAM + disk + Redis - cold TTFT (storing every chunk), then the same prompts again: warm
  from L1; then the multi-round chat with the cache;
* **l2**: a restart on the same disk directory with the RAM tier off: warm from L2 only;
* **l3**: a fresh worker with only Redis: warm from L3 only;
* **limit**: in this process, the time to scatter the same chunks from RAM into a paged cache of
  the server's layout (what a warm load cannot beat).

Reported ratios: cold/warm per tier, warm/limit, cold-on/cold-off. The multi-round chat is shaped
like LMCache's ``multi-round-qa``: users share a system prompt, each round appends a question and
the previous answer; mean TTFT per round, cache on vs off. ``--json`` prints one JSON object last.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx

from lmcache_disagg.bench.streaming import stream_completion
from lmcache_disagg.tiny_model import TinyModelSpec, build_tiny_model
from lmcache_disagg.vllm_server import VLLMServer, VLLMServerSpec, free_port

__all__ = ["main"]

VOCAB = 512
BLOCK_SIZE = 128
CHUNK_SIZE = 256


def _stream(url: str, model: str, prompt: list[int], max_tokens: int) -> tuple[float, list[int]]:
    """TTFT in seconds and the generated token ids of one streamed greedy completion."""
    result = stream_completion(url, model, prompt, max_tokens)
    return result.ttft_s, result.token_ids


class _Redis:
    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server not found")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.RedisError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.1)
        client.close()

    def stop(self) -> None:
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout=10)


def _server(model: Path, log: Path, extra: dict[str, Any], max_len: int) -> VLLMServer:
    kv = {
        "kv_connector": "LMCacheDisaggConnector",
        "kv_connector_module_path": "lmcache_disagg.connector",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {
            "channel": "tcp",
            "listen_port": free_port(),
            "chunk_size": CHUNK_SIZE,
            **extra,
        },
    }
    return VLLMServer(
        VLLMServerSpec(
            model_dir=str(model),
            cpu_core=0,
            kv_transfer_config=kv,
            kv_cache_gib=2,
            max_model_len=max_len,
            extra_args=("--no-enable-prefix-caching", "--block-size", str(BLOCK_SIZE)),
        ),
        log,
    )


def _metric(url: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` on a worker's ``/metrics`` whose labels include ``labels``."""
    total = 0.0
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if not line.startswith(name) or line[len(name) : len(name) + 1] not in ("{", " "):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


def _ttfts(url: str, model: str, prompts: list[list[int]], max_tokens: int) -> list[float]:
    return [_stream(url, model, prompt, max_tokens)[0] for prompt in prompts]


def _chat(
    url: str, model: str, rng: random.Random, users: int, rounds: int, system: int,
    question: int, answer: int,
) -> list[float]:  # fmt: skip
    """Mean TTFT per round over ``users`` conversations sharing one system prompt."""
    system_ids = [rng.randrange(3, VOCAB) for _ in range(system)]
    histories = [list(system_ids) for _ in range(users)]
    means: list[float] = []
    for _ in range(rounds):
        samples = []
        for history in histories:
            history += [rng.randrange(3, VOCAB) for _ in range(question)]
            ttft, tokens = _stream(url, model, history, answer)
            samples.append(ttft)
            history += tokens
        means.append(round(statistics.mean(samples), 4))
    return means


def _scatter_limit(spec: TinyModelSpec, num_tokens: int, repeats: int = 5) -> float:
    """Seconds to scatter ``num_tokens`` tokens of canonical chunks from RAM into a paged cache."""
    import torch

    from lmcache_disagg.kernels import KVLayout, chunk_view, scatter

    head_dim = spec.hidden // spec.heads
    layout = KVLayout("cpu", BLOCK_SIZE, spec.kv_heads, head_dim, torch.float32)
    blocks = -(-num_tokens // BLOCK_SIZE) + 1
    caches = layout.empty_caches(spec.layers, blocks)  # one allocation, as vLLM lays it out
    block_ids = torch.randperm(blocks)[: blocks - 1].to(torch.int64)
    page_bytes = layout.chunk_bytes(spec.layers, CHUNK_SIZE)
    pages = []
    for start in range(0, num_tokens, CHUNK_SIZE):
        n = min(CHUNK_SIZE, num_tokens - start)
        page = torch.randint(0, 255, (page_bytes,), dtype=torch.uint8)
        pages.append((chunk_view(page, layout, spec.layers, n), start, start + n))
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        for view, lo, hi in pages:
            scatter(view, caches, layout, block_ids, lo, hi)
        best = min(best, time.perf_counter() - began)
    return best


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0:
        return None
    return round(a / b, 2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lmcache-disagg bench cache", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--model-dir", default=None, help="default .models/bench-<layers>x<hidden>")
    parser.add_argument("--short", type=int, default=2048, help="tokens of the short prompts")
    parser.add_argument("--long", type=int, default=8000, help="tokens of the long prompts")
    parser.add_argument("--repeats", type=int, default=5, help="short prompts per measurement")
    parser.add_argument("--long-repeats", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--system-tokens", type=int, default=1000)
    parser.add_argument("--question-tokens", type=int, default=200)
    parser.add_argument("--answer-tokens", type=int, default=32)
    parser.add_argument("--no-remote", action="store_true", help="skip the L3 (Redis) setup")
    args = parser.parse_args(argv)

    heads = max(1, args.hidden // 64)
    spec = TinyModelSpec(
        layers=args.layers,
        hidden=args.hidden,
        intermediate=2 * args.hidden,
        heads=heads,
        kv_heads=max(1, heads // 2),
        vocab=VOCAB,
        dtype="float32",
    )
    model = build_tiny_model(args.model_dir or f".models/bench-{args.layers}x{args.hidden}", spec)
    name = str(model)
    rng = random.Random(2026)
    short = [[rng.randrange(3, VOCAB) for _ in range(args.short)] for _ in range(args.repeats)]
    long = [[rng.randrange(3, VOCAB) for _ in range(args.long)] for _ in range(args.long_repeats)]
    warmup = [[rng.randrange(3, VOCAB) for _ in range(300)]]
    chat_len = args.system_tokens + args.rounds * (args.question_tokens + args.answer_tokens)
    max_len = min(spec.max_positions, max(args.long, chat_len) + args.max_tokens + 64)
    work = Path(tempfile.mkdtemp(prefix="lmcache-disagg-bench-cache-"))
    disk = work / "disk"
    disk.mkdir()
    out: dict[str, Any] = {"model": asdict(spec), "logs": str(work)}
    outputs: dict[str, list[int]] = {}

    def median(values: list[float]) -> float:
        return round(statistics.median(values), 4)

    redis_server: _Redis | None = None
    if not args.no_remote:
        try:
            redis_server = _Redis(work)
        except RuntimeError as exc:
            out["l3_skipped"] = str(exc)
    size = {"max_local_cpu_size": "8GiB", "max_local_disk_size": "20GiB"}
    try:
        print("[off] cache off: cold TTFT and multi-round chat ...", flush=True)
        with _server(model, work / "off.log", {"local_cpu": False}, max_len) as server:
            _ttfts(server.url, name, warmup, 2)
            out["cold_off_short_s"] = median(_ttfts(server.url, name, short, args.max_tokens))
            outputs["off"] = _stream(server.url, name, short[0], args.max_tokens)[1]
            out["chat_off_mean_ttft_per_round_s"] = _chat(
                server.url, name, random.Random(7), args.users, args.rounds,
                args.system_tokens, args.question_tokens, args.answer_tokens,
            )  # fmt: skip
        on_extra: dict[str, Any] = {"local_disk": str(disk), **size}
        if redis_server is not None:
            on_extra["remote_url"] = redis_server.url
        print("[on] RAM + disk + Redis: cold, warm from L1, multi-round chat ...", flush=True)
        with _server(model, work / "on.log", on_extra, max_len) as server:
            _ttfts(server.url, name, warmup, 2)
            stored = "lmcache_disagg_cache_forward_seconds_total"
            before = _metric(server.url, stored)
            out["cold_on_short_s"] = median(_ttfts(server.url, name, short, args.max_tokens))
            # Storing's own time on the forward path: gathering each chunk into RAM and
            # committing it (disk and Redis writes run in the store's background writer).
            time.sleep(1.0)  # the last step's metrics reach the frontend
            spent = (_metric(server.url, stored) - before) / len(short)
            out["storing_on_forward_path_short_s"] = round(spent, 4)
            out["cold_on_long_s"] = median(_ttfts(server.url, name, long, args.max_tokens))
            out["warm_l1_short_s"] = median(_ttfts(server.url, name, short, args.max_tokens))
            out["warm_l1_long_s"] = median(_ttfts(server.url, name, long, args.max_tokens))
            outputs["l1"] = _stream(server.url, name, short[0], args.max_tokens)[1]
            out["chat_on_mean_ttft_per_round_s"] = _chat(
                server.url, name, random.Random(7), args.users, args.rounds,
                args.system_tokens, args.question_tokens, args.answer_tokens,
            )  # fmt: skip
        print("[l2] restart on the same disk, RAM tier off: warm from L2 ...", flush=True)
        l2_extra = {"local_cpu": False, "local_disk": str(disk), **size}
        with _server(model, work / "l2.log", l2_extra, max_len) as server:
            _ttfts(server.url, name, warmup, 2)
            out["warm_l2_short_s"] = median(_ttfts(server.url, name, short, args.max_tokens))
            out["warm_l2_long_s"] = median(_ttfts(server.url, name, long, args.max_tokens))
            outputs["l2"] = _stream(server.url, name, short[0], args.max_tokens)[1]
        if redis_server is not None:
            print("[l3] fresh worker, Redis only: warm from L3 ...", flush=True)
            l3_extra = {"local_cpu": False, "remote_url": redis_server.url}
            with _server(model, work / "l3.log", l3_extra, max_len) as server:
                _ttfts(server.url, name, warmup, 2)
                out["warm_l3_short_s"] = median(_ttfts(server.url, name, short, args.max_tokens))
                out["warm_l3_long_s"] = median(_ttfts(server.url, name, long, args.max_tokens))
                outputs["l3"] = _stream(server.url, name, short[0], args.max_tokens)[1]
    finally:
        if redis_server is not None:
            redis_server.stop()
    print("[limit] scatter from RAM into a paged cache ...", flush=True)
    out["limit_short_s"] = round(_scatter_limit(spec, args.short - 1), 5)
    out["limit_long_s"] = round(_scatter_limit(spec, args.long - 1), 5)
    cold_s, cold_l = out["cold_on_short_s"], out["cold_on_long_s"]
    out["ratios"] = {
        "cold_over_warm_l1_short": _ratio(cold_s, out.get("warm_l1_short_s")),
        "cold_over_warm_l2_short": _ratio(cold_s, out.get("warm_l2_short_s")),
        "cold_over_warm_l3_short": _ratio(cold_s, out.get("warm_l3_short_s")),
        "cold_over_warm_l1_long": _ratio(cold_l, out.get("warm_l1_long_s")),
        "cold_over_warm_l2_long": _ratio(cold_l, out.get("warm_l2_long_s")),
        "cold_over_warm_l3_long": _ratio(cold_l, out.get("warm_l3_long_s")),
        "warm_l1_over_limit_short": _ratio(out.get("warm_l1_short_s"), out["limit_short_s"]),
        "cold_on_over_cold_off_short": _ratio(cold_s, out["cold_off_short_s"]),
        "storing_share_of_cold_short": round(out["storing_on_forward_path_short_s"] / cold_s, 4),
    }
    out["identical_outputs"] = all(tokens == outputs["off"] for tokens in outputs.values())
    out["short_tokens"], out["long_tokens"] = args.short, args.long
    for key, value in out.items():
        if key not in ("model", "ratios"):
            print(f"{key}: {value}")
    for key, value in out["ratios"].items():
        print(f"{key}: {value}")
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
