"""``lmcache-disagg bench routing``: routing policies on a multi-round chat, over real HTTP.

Every routing path is real: the proxy (``lmcache-disagg-proxy``, one process per policy),
vllm-router 0.1.17 (its ``cache_aware`` policy, in its regular mode) and the oracle all route
real ``/v1/chat/completions`` requests, sent by the openai SDK, to the same kind of **stub D
workers** (:mod:`.stub_worker`), restarted empty for every policy. Each stub:

* renders and tokenizes the chat with the model's tokenizer exactly as the proxy does, keys the
  prompt with the real chunk-key chain and keeps an LRU of ``--cache-chunks`` chunk keys, smaller
  than the workload's working set (so placement matters);
* publishes what it stores and evicts as real KV events (the proxy's ``cache_aware`` index is fed
  by them; vllm-router keeps its own approximate tree of the request text instead);
* takes time like an engine (:class:`~.stub_worker.CostModel`): prefills run one at a time, each
  ``--prefill-fixed-ms`` plus ``--prefill-us-per-token`` for every prompt token it did not have
  cached; decoding runs beside them at ``--decode-ms-per-token``;
* reports ``usage.prompt_tokens_details.cached_tokens`` (its own hit), which the client reads.

The workers are D's without a P (every policy sees the same aggregated workers: a D prefills what
it lacks), so the comparison is the routing alone.

Workload, shaped like LMCache's multi-round QA benchmark: ``--users`` users, ``--rounds`` rounds
each, one shared system prompt, a per-user context and history (every round sends the system
prompt, the user's context, all previous questions and answers, and a new question); a user's
next round starts a think time after the previous answer ended. Text is drawn (seeded) from the
tiny model's vocabulary.

Policies, one after another on fresh workers with the same workload:

* ``round_robin``, ``prefix_aware`` (today's hash of the prompt start) and ``cache_aware``, each
  through the proxy;
* ``vllm-router cache_aware`` (skipped with a note when the binary is missing: ``make bench``
  installs it);
* ``oracle``: the client itself asks every worker what it holds (``POST /stub/peek``, exact) and
  applies ``cache_aware``'s cost function and imbalance bound with its own count of outstanding
  tokens, then sends straight to the chosen worker. Its TTFT therefore carries no proxy hop.

Reported per policy: the cache hit rate (cached prompt tokens / prompt tokens, from the workers'
own usage reports), mean and p90 TTFT (to the first streamed content), and the load imbalance
(most requests on one worker / mean requests per worker). ``--json`` prints one JSON object as
the last stdout line. ``--simulate`` runs the virtual-time simulation instead
(:mod:`.routing_sim`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lmcache_disagg.bench.cluster import (
    Proc,
    free_port,
    free_port_pair,
    start_proxy,
    start_stub,
    wait_http,
)
from lmcache_disagg.bench.proxy import router_binary
from lmcache_disagg.bench.routing_stats import parse_range, policy_figures
from lmcache_disagg.bench.stub_cache import STUB_FINGERPRINT
from lmcache_disagg.proxy.cache_aware import CacheAwareSettings, Candidate, choose

__all__ = ["POLICIES", "HttpBenchSettings", "main", "run"]

ROUTER_CACHE_AWARE = "vllm-router cache_aware"
POLICIES = ("round_robin", "prefix_aware", "cache_aware", ROUTER_CACHE_AWARE, "oracle")
_PROXY_POLICIES = ("round_robin", "prefix_aware", "cache_aware")
_REQUEST_TIMEOUT = 120.0
_START_TIMEOUT = 30.0


@dataclass(frozen=True)
class HttpBenchSettings:
    users: int = 12
    rounds: int = 5
    system_words: int = 400
    context_words: int = 250
    question_words: tuple[int, int] = (15, 45)
    answer_tokens: tuple[int, int] = (16, 48)
    think_s: float = 1.0
    workers: int = 3
    cache_fraction: float = 0.4
    """Each D's cache as a fraction of the working set (all D's together hold ``workers`` x it)."""
    cache_chunks: int | None = None
    """Overrides ``cache_fraction`` with a chunk count."""
    prefill_fixed_ms: float = 5.0
    prefill_us_per_token: float = 100.0
    decode_ms_per_token: float = 5.0
    seed: int = 0

    def validate(self) -> None:
        if self.users < 1 or self.rounds < 1 or self.workers < 2:
            raise ValueError("need --users >= 1, --rounds >= 1 and --workers >= 2")
        for lo, hi in (self.question_words, self.answer_tokens):
            if not 1 <= lo <= hi:
                raise ValueError("ranges must be 1 <= LO <= HI")
        if not 0 < self.cache_fraction <= 1:
            raise ValueError("--cache-fraction must be in (0, 1]")
        if self.cache_chunks is not None and self.cache_chunks < 1:
            raise ValueError("--cache-chunks must be >= 1")
        if min(self.think_s, self.prefill_fixed_ms, self.prefill_us_per_token) < 0:
            raise ValueError("times must be >= 0")


@dataclass(frozen=True)
class _Round:
    question: str
    answer_tokens: int


@dataclass(frozen=True)
class _Workload:
    system: str
    contexts: list[str]
    rounds: list[list[_Round]]
    think: list[list[float]]
    starts: list[float]


def _words(tokenizer_dir: str) -> list[str]:
    vocab = json.loads((Path(tokenizer_dir) / "tokenizer.json").read_text())["model"]["vocab"]
    words = sorted({w.lstrip("Ġ") for w in vocab if re.fullmatch(r"Ġ?[a-z]{3,}", w)})
    if len(words) < 20:
        raise ValueError(f"the tokenizer in {tokenizer_dir} has too few word tokens")
    return words


def _workload(s: HttpBenchSettings, words: Sequence[str]) -> _Workload:
    rng = random.Random(s.seed)

    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    system = text(s.system_words)
    contexts = [text(s.context_words) for _ in range(s.users)]
    rounds = [
        [_Round(text(rng.randint(*s.question_words)), rng.randint(*s.answer_tokens))
         for _ in range(s.rounds)]
        for _ in range(s.users)
    ]  # fmt: skip
    think = [[rng.uniform(0.5, 1.5) * s.think_s for _ in range(s.rounds)] for _ in range(s.users)]
    starts = [rng.uniform(0, s.think_s) for _ in range(s.users)]
    return _Workload(system, contexts, rounds, think, starts)


def _answer_text(n: int) -> str:
    # What a stub worker streams for max_tokens=n (see stub_worker): the history the user sends on.
    return "".join(f" tok{t}" for t in range(n))


def _messages(w: _Workload, user: int, upto: int) -> list[dict[str, str]]:
    messages = [
        {"role": "system", "content": w.system},
        {"role": "user", "content": w.contexts[user]},
        {"role": "assistant", "content": "Noted."},
    ]
    for r in range(upto + 1):
        messages.append({"role": "user", "content": w.rounds[user][r].question})
        if r < upto:
            messages.append(
                {"role": "assistant", "content": _answer_text(w.rounds[user][r].answer_tokens)}
            )
    return messages


def _working_set_chunks(w: _Workload, tokenizer_dir: str) -> int:
    """Distinct chunk keys of every request of the workload (the whole run's working set)."""
    from lmcache_disagg.keys import chain_root, chunk_keys
    from lmcache_disagg.proxy.tokenizer import PromptTokenizer

    tokenizer = PromptTokenizer.from_dir(tokenizer_dir)
    root = chain_root(STUB_FINGERPRINT)
    keys: set[bytes] = set()
    for user in range(len(w.contexts)):
        for r in range(len(w.rounds[user])):
            ids = tokenizer.request_tokens({"messages": _messages(w, user, r)})
            assert ids is not None
            keys.update(chunk_keys(root, ids, STUB_FINGERPRINT.chunk_size))
    return len(keys)


@dataclass
class _Result:
    policy: str
    ttfts: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    requests: int = 0
    errors: list[str] = field(default_factory=list)
    per_worker: list[int] = field(default_factory=list)
    wall_s: float = 0.0
    proxy_metrics: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            **policy_figures(self.cached_tokens, self.prompt_tokens, self.ttfts, self.per_worker),
            "requests": self.requests,
            "errors": len(self.errors),
            "first_errors": self.errors[:3],
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "wall_s": self.wall_s,
        }
        if self.proxy_metrics:
            out["proxy_metrics"] = self.proxy_metrics
        return out


class _Oracle:
    """Exact placement: every worker's cache read before each request; load counted here."""

    def __init__(self, workers: Sequence[str]) -> None:
        self.workers = list(workers)
        self.outstanding = dict.fromkeys(self.workers, 0)
        self.settings = CacheAwareSettings()

    async def pick(self, http: Any, body: dict[str, Any]) -> tuple[str, int]:
        async def peek(worker: str) -> tuple[int, int]:
            async with http.post(f"http://{worker}/stub/peek", json=body) as resp:
                data = await resp.json()
                return int(data["cached_tokens"]), int(data["prompt_tokens"])

        hits = await asyncio.gather(*(peek(w) for w in self.workers))
        prompt = hits[0][1]
        cands = [
            Candidate(w, self.outstanding[w], cached)
            for w, (cached, _) in zip(self.workers, hits, strict=True)
        ]
        tie = json.dumps(body["messages"][-1]).encode()
        choice = choose(cands, prompt, self.settings, tie)
        assert choice is not None
        return choice.name, prompt


async def _drive(
    w: _Workload, target: str | None, oracle: _Oracle | None, model: str, result: _Result
) -> None:
    import aiohttp
    import openai

    http = aiohttp.ClientSession()
    clients: dict[str, openai.AsyncOpenAI] = {}

    def client(addr: str) -> openai.AsyncOpenAI:
        if addr not in clients:
            clients[addr] = openai.AsyncOpenAI(
                base_url=f"http://{addr}/v1", api_key="none", timeout=_REQUEST_TIMEOUT,
                max_retries=0,
            )  # fmt: skip
        return clients[addr]

    async def one(user: int, r: int) -> float:
        body: dict[str, Any] = {"messages": _messages(w, user, r)}
        t0 = time.perf_counter()
        addr = target
        prompt_estimate = 0
        if oracle is not None:
            addr, prompt_estimate = await oracle.pick(http, body)
            oracle.outstanding[addr] += prompt_estimate
        assert addr is not None
        first: float | None = None
        usage = None
        try:
            stream = await client(addr).chat.completions.create(
                model=model, messages=body["messages"], max_tokens=w.rounds[user][r].answer_tokens,
                temperature=0.0, stream=True, stream_options={"include_usage": True},
            )  # fmt: skip
            async for chunk in stream:
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = time.perf_counter()
                if chunk.usage is not None:
                    usage = chunk.usage
        finally:
            if oracle is not None:
                oracle.outstanding[addr] -= prompt_estimate
        end = time.perf_counter()
        if first is None or usage is None:
            raise RuntimeError(f"user {user} round {r}: stream without content or usage")
        result.ttfts.append(first - t0)
        result.prompt_tokens += usage.prompt_tokens
        details = usage.prompt_tokens_details
        result.cached_tokens += (details.cached_tokens or 0) if details is not None else 0
        result.requests += 1
        return end

    async def user_loop(user: int) -> None:
        await asyncio.sleep(w.starts[user])
        for r in range(len(w.rounds[user])):
            try:
                await one(user, r)
            except Exception as exc:  # every failure is reported and counted, none hidden
                result.errors.append(f"user {user} round {r}: {type(exc).__name__}: {exc}")
            await asyncio.sleep(w.think[user][r])

    try:
        await asyncio.gather(*(user_loop(u) for u in range(len(w.contexts))))
    finally:
        for c in clients.values():
            await c.close()
        await http.close()


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5.0) as resp:
        return json.loads(resp.read())


def _post_json(url: str, body: dict[str, Any]) -> Any:
    data = json.dumps(body).encode()
    req = urllib.request.Request(url, data, {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=30.0) as resp:
        return json.loads(resp.read())


_WARMUP = {"model": "stub-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


def _warm_up(stubs: Sequence[str], target: str | None) -> None:
    """One tiny chat on every worker and through the router (first-request costs such as the
    template compile stay out of the figures); then the workers' request counts are reset."""
    for addr in [*stubs, *([target] if target else [])]:
        _post_json(f"http://{addr}/v1/chat/completions", _WARMUP)
    for addr in stubs:
        _post_json(f"http://{addr}/stub/clear", {})


def _proxy_metrics(addr: str) -> dict[str, float]:
    """The cache_aware counters the proxy exports (predicted vs actual hit tokens, decisions)."""
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=5.0) as resp:
        text = resp.read().decode()
    wanted = (
        "lmcache_proxy_predicted_hit_tokens_sum",
        "lmcache_proxy_actual_hit_tokens_sum",
        "lmcache_proxy_kv_index_keys",
    )
    out: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in wanted:
            out[name] = out.get(name, 0.0) + float(value)
    return out


def _worker_ports(count: int) -> list[tuple[int, int]]:
    """(HTTP port, KV-events port) per worker, all distinct; the events port + 1 (its snapshot
    socket) is free and distinct too."""
    taken: set[int] = set()
    out: list[tuple[int, int]] = []
    deadline = time.monotonic() + 10
    while len(out) < count:
        if time.monotonic() > deadline:
            raise RuntimeError("no free loopback ports for the stub workers")
        http, events = free_port(), free_port_pair()
        wanted = {http, events, events + 1}
        if len(wanted) == 3 and not wanted & taken:
            taken |= wanted
            out.append((http, events))
    return out


def _run_policy(
    policy: str, s: HttpBenchSettings, w: _Workload, tokenizer_dir: str, cache_chunks: int,
    log_dir: Path,
) -> _Result | str:  # fmt: skip
    """One policy on fresh workers; a string says why it could not run."""
    procs: list[Proc] = []
    result = _Result(policy)
    try:
        stubs = []
        events = []
        for stub_port, ev in _worker_ports(s.workers):
            stub = start_stub(
                "decode", stub_port, log_dir,
                ["--kv-events", f"tcp://127.0.0.1:{ev}", "--tokenizer", tokenizer_dir,
                 "--cache-chunks", str(cache_chunks), "--model", "stub-model",
                 "--prefill-fixed-ms", str(s.prefill_fixed_ms),
                 "--prefill-us-per-token", str(s.prefill_us_per_token),
                 "--decode-ms-per-token", str(s.decode_ms_per_token)],
            )  # fmt: skip
            procs.append(stub)
            stubs.append(f"127.0.0.1:{stub_port}")
            events.append(f"tcp://127.0.0.1:{ev}")
        for addr, proc in zip(stubs, procs, strict=True):
            wait_http(f"http://{addr}/health", _START_TIMEOUT, proc)
        target: str | None = None
        oracle = None
        if policy in _PROXY_POLICIES:
            port = free_port()
            extra = ["--policy", policy]
            if policy == "cache_aware":
                extra += ["--tokenizer", tokenizer_dir]
                for addr, endpoint in zip(stubs, events, strict=True):
                    extra += ["--kv-events", f"{addr}={endpoint}"]
            proxy = start_proxy(port, [], stubs, log_dir, extra)
            procs.append(proxy)
            wait_http(f"http://127.0.0.1:{port}/health", _START_TIMEOUT, proxy)
            target = f"127.0.0.1:{port}"
        elif policy == ROUTER_CACHE_AWARE:
            binary = router_binary()
            if binary is None:
                return "vllm-router is not installed (make bench installs it)"
            port = free_port()
            argv = [binary, "--host", "127.0.0.1", "--port", str(port), "--policy", "cache_aware",
                    "--worker-urls", *(f"http://{a}" for a in stubs)]  # fmt: skip
            router = Proc("vllm-router", argv, log_dir / "vllm-router.log", dict(os.environ))
            procs.append(router)
            wait_http(f"http://127.0.0.1:{port}/health", _START_TIMEOUT, router)
            target = f"127.0.0.1:{port}"
        else:
            oracle = _Oracle(stubs)
        _warm_up(stubs, target)
        t0 = time.monotonic()
        asyncio.run(_drive(w, target, oracle, "stub-model", result))
        result.wall_s = time.monotonic() - t0
        result.per_worker = [
            int(_get_json(f"http://{a}/stub/log")["counts"]["requests"]) for a in stubs
        ]
        if policy == "cache_aware" and target is not None:
            result.proxy_metrics = _proxy_metrics(target)
    finally:
        for proc in reversed(procs):
            proc.stop()
    return result


def _tokenizer_dir(given: str | None) -> str:
    if given:
        return given
    from lmcache_disagg.tiny_model import TinyModelSpec, build_tiny_model

    return str(build_tiny_model(Path(".models") / "tiny-f32", TinyModelSpec(dtype="float32")))


def run(
    s: HttpBenchSettings, policies: Sequence[str] = POLICIES, tokenizer_dir: str | None = None
) -> dict[str, Any]:
    s.validate()
    tok = _tokenizer_dir(tokenizer_dir)
    w = _workload(s, _words(tok))
    working_set = _working_set_chunks(w, tok)
    cache_chunks = s.cache_chunks or max(1, int(working_set * s.cache_fraction))
    results: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="bench-routing-") as tmp:
        for policy in policies:
            outcome = _run_policy(policy, s, w, tok, cache_chunks, Path(tmp))
            if isinstance(outcome, str):
                skipped[policy] = outcome
            else:
                results[policy] = outcome.summary()
    out: dict[str, Any] = {
        "bench": "routing",
        "simulated_workers": False,
        "note": "real HTTP: openai SDK -> proxy / vllm-router / oracle -> stub D workers (real "
        "tokenizer, chunk keys and KV events; engine time from a cost model)",
        "settings": asdict(s),
        "tokenizer": tok,
        "working_set_chunks": working_set,
        "cache_chunks_per_worker": cache_chunks,
        "chunk_tokens": STUB_FINGERPRINT.chunk_size,
        "results": results,
        "skipped": skipped,
    }
    oracle = results.get("oracle")
    if oracle and oracle["hit_rate"] > 0:
        out["hit_rate_vs_oracle"] = {
            name: row["hit_rate"] / oracle["hit_rate"]
            for name, row in results.items()
            if name != "oracle"
        }
    return out


def _print(out: dict[str, Any]) -> None:
    s = out["settings"]
    print(out["note"])
    print(
        f"{s['users']} users x {s['rounds']} rounds, {s['workers']} D's with "
        f"{out['cache_chunks_per_worker']} chunks of {out['chunk_tokens']} tokens each; "
        f"working set {out['working_set_chunks']} chunks"
    )
    print(
        f"{'policy':<26}{'hit rate':>9}{'mean TTFT':>12}{'p90 TTFT':>12}{'imbalance':>11}"
        f"{'errors':>8}{'vs oracle':>11}"
    )
    ratios = out.get("hit_rate_vs_oracle", {})
    for name, row in out["results"].items():
        ratio = f"{ratios[name]:.3f}" if name in ratios else "-"
        print(
            f"{name:<26}{row['hit_rate']:>9.3f}{row['mean_ttft_ms']:>10.1f}ms"
            f"{row['p90_ttft_ms']:>10.1f}ms{row['load_imbalance']:>11.2f}{row['errors']:>8}"
            f"{ratio:>11}"
        )
    for name, why in out["skipped"].items():
        print(f"{name}: skipped: {why}")


def main(argv: list[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if "--simulate" in args_list:
        from lmcache_disagg.bench import routing_sim

        args_list.remove("--simulate")
        return routing_sim.main(args_list)
    parser = argparse.ArgumentParser(prog="lmcache-disagg bench routing", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    d = HttpBenchSettings()
    parser.add_argument("--simulate", action="store_true",
                        help="run the virtual-time simulation instead (its own flags: "
                        "--simulate --help)")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.add_argument("--users", type=int, default=d.users)
    parser.add_argument("--rounds", type=int, default=d.rounds)
    parser.add_argument("--system-words", type=int, default=d.system_words)
    parser.add_argument("--context-words", type=int, default=d.context_words)
    parser.add_argument(
        "--question-words", type=parse_range, default=d.question_words, metavar="LO,HI"
    )
    parser.add_argument(
        "--answer-tokens", type=parse_range, default=d.answer_tokens, metavar="LO,HI"
    )
    parser.add_argument("--think-s", type=float, default=d.think_s)
    parser.add_argument("--workers", type=int, default=d.workers, help="stub D workers")
    parser.add_argument("--cache-fraction", type=float, default=d.cache_fraction,
                        help="each D's cache as a fraction of the working set")  # fmt: skip
    parser.add_argument("--cache-chunks", type=int, default=None,
                        help="each D's cache in chunks (overrides --cache-fraction)")  # fmt: skip
    parser.add_argument("--prefill-fixed-ms", type=float, default=d.prefill_fixed_ms)
    parser.add_argument("--prefill-us-per-token", type=float, default=d.prefill_us_per_token)
    parser.add_argument("--decode-ms-per-token", type=float, default=d.decode_ms_per_token)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--policies", default=",".join(POLICIES),
                        help=f"comma-separated, from: {', '.join(POLICIES)}")  # fmt: skip
    parser.add_argument("--tokenizer", metavar="DIR",
                        help="the model directory whose tokenizer the workers and the proxy use "
                        "(default: the tiny model, built under .models/)")  # fmt: skip
    args = parser.parse_args(args_list)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    unknown = sorted(set(policies) - set(POLICIES))
    if unknown or not policies:
        parser.error(f"unknown policies {unknown}; choose from {', '.join(POLICIES)}")
    if args.tokenizer and not (Path(args.tokenizer) / "tokenizer.json").is_file():
        parser.error(f"--tokenizer {args.tokenizer}: no tokenizer.json there")
    settings = HttpBenchSettings(
        users=args.users, rounds=args.rounds, system_words=args.system_words,
        context_words=args.context_words, question_words=args.question_words,
        answer_tokens=args.answer_tokens, think_s=args.think_s, workers=args.workers,
        cache_fraction=args.cache_fraction, cache_chunks=args.cache_chunks,
        prefill_fixed_ms=args.prefill_fixed_ms, prefill_us_per_token=args.prefill_us_per_token,
        decode_ms_per_token=args.decode_ms_per_token, seed=args.seed,
    )  # fmt: skip
    try:
        settings.validate()
    except ValueError as exc:
        parser.error(str(exc))
    out = run(settings, policies, args.tokenizer)
    _print(out)
    if args.json:
        print(json.dumps(out))
    sys.stdout.flush()
    return 0
