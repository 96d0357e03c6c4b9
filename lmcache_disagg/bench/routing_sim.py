"""``lmcache-disagg bench routing --simulate``: routing policies on a multi-round chat (simulated D's).

**The workers are simulated**; the routing path is real. Each simulated D keeps a chunk cache (LRU,
``--cache-chunks`` chunks, smaller than the workload's working set) keyed by the real chunk-key
chain (:mod:`lmcache_disagg.keys`), and publishes every store and eviction through a real
:class:`~lmcache_disagg.transfer.event_publisher.KVEventPublisher` on loopback. ``cache_aware``
routes from a real :class:`~lmcache_disagg.proxy.kvindex.KVIndex` fed by a real
:class:`~lmcache_disagg.proxy.kvevents.KVEventSubscriber` (each decision waits, with a deadline,
until the index has applied every event published so far; a decision that had to go without is
counted as ``stale_decisions``).

Workload (shaped like LMCache's multi-round QA benchmark): ``--users`` users, ``--rounds`` rounds
each, one shared system prompt, and per-user history (every round's prompt is the system prompt,
the user's own context, all previous questions and answers, and a new question). Token ids are synthetic (seeded).

Time is virtual (a discrete-event simulation): a worker prefills one request at a time, taking
``--fixed-ms`` plus ``--prefill-us-per-token`` for every uncached prompt token; TTFT is the wait
for the worker's prefill queue plus that prefill. Decoding runs beside prefill (batched) and
takes ``--decode-ms-per-token`` per answer token; the user's next round comes a think time later.

Policies compared in one run, each on a fresh cluster with the same workload:

* ``round_robin``;
* ``prefix_aware``: today's rendezvous hash of the prompt start (the proxy's ``prefix_key`` and
  :mod:`lmcache_disagg.proxy.routing`'s hash);
* ``cache_aware``: :class:`~lmcache_disagg.proxy.cache_aware.CacheAwarePolicy` on the index;
* ``oracle``: the same cost function and imbalance bound on every worker's exact cache.

Reported per policy: the cache hit rate (hit prompt tokens / prompt tokens), mean and p90 TTFT,
and the load imbalance (most requests on one worker / mean requests per worker). vllm-router's own
``cache_aware`` needs real HTTP workers: it is in the real-HTTP run (:mod:`.routing`), not here.

``--json`` prints one JSON object as the last stdout line.
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import sys
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import xxhash

from lmcache_disagg.bench.routing_stats import parse_range, policy_figures
from lmcache_disagg.keys import chain_root, chunk_keys
from lmcache_disagg.proxy.cache_aware import CacheAwarePolicy, CacheAwareSettings, Candidate, choose
from lmcache_disagg.proxy.kvevents import EventSource, KVEventSubscriber
from lmcache_disagg.proxy.kvindex import KVIndex
from lmcache_disagg.proxy.validation import prefix_key
from lmcache_disagg.transfer.event_publisher import KVEventPublisher, PublisherSettings
from lmcache_disagg.transfer.protocol import LayoutFingerprint

__all__ = ["POLICIES", "BenchSettings", "main", "run"]

POLICIES = ("round_robin", "prefix_aware", "cache_aware", "oracle")
_VOCAB = 32_000
_SYNC_DEADLINE = 2.0
"""Seconds a cache_aware decision waits for the index to apply every published event."""


@dataclass(frozen=True)
class BenchSettings:
    users: int = 24
    rounds: int = 6
    system_tokens: int = 1024
    user_context_tokens: int = 1024
    question_tokens: tuple[int, int] = (48, 160)
    answer_tokens: tuple[int, int] = (64, 192)
    think_s: float = 2.0
    workers: int = 3
    cache_chunks: int = 320
    chunk_size: int = 64
    fixed_ms: float = 5.0
    prefill_us_per_token: float = 100.0
    decode_ms_per_token: float = 20.0
    seed: int = 0

    def validate(self) -> None:
        if self.users < 1 or self.rounds < 1 or self.workers < 2:
            raise ValueError("need --users >= 1, --rounds >= 1 and --workers >= 2")
        if self.cache_chunks < 1 or self.chunk_size < 1 or self.system_tokens < 0:
            raise ValueError("--cache-chunks and --chunk-size must be >= 1")
        for lo, hi in (self.question_tokens, self.answer_tokens):
            if not 1 <= lo <= hi:
                raise ValueError("token ranges must be 1 <= LO <= HI")


@dataclass(frozen=True)
class _Turn:
    question: list[int]
    answer: list[int]


def _workload(s: BenchSettings) -> tuple[list[int], list[list[int]], list[list[_Turn]]]:
    rng = random.Random(s.seed)
    system = [rng.randrange(_VOCAB) for _ in range(s.system_tokens)]
    contexts = [
        [rng.randrange(_VOCAB) for _ in range(s.user_context_tokens)] for _ in range(s.users)
    ]
    users = []
    for _ in range(s.users):
        turns = []
        for _ in range(s.rounds):
            q = [rng.randrange(_VOCAB) for _ in range(rng.randint(*s.question_tokens))]
            a = [rng.randrange(_VOCAB) for _ in range(rng.randint(*s.answer_tokens))]
            turns.append(_Turn(q, a))
        users.append(turns)
    return system, contexts, users


@dataclass
class _Worker:
    name: str
    capacity: int
    publisher: KVEventPublisher
    cache: OrderedDict[bytes, None] = field(default_factory=OrderedDict)
    prefill_free_at: float = 0.0
    inflight: list[tuple[float, int]] = field(default_factory=list)
    requests: int = 0
    busy_s: float = 0.0

    def outstanding(self, now: float) -> int:
        self.inflight = [(end, n) for end, n in self.inflight if end > now]
        return sum(n for _, n in self.inflight)

    def cached_chunks(self, keys: Sequence[bytes]) -> int:
        count = 0
        for key in keys:
            if key not in self.cache:
                break
            count += 1
        return count

    def admit(self, keys: Sequence[bytes], hit_chunks: int) -> None:
        """Touch the hit chunks, store the rest (LRU), publish what changed."""
        for key in keys[:hit_chunks]:
            self.cache.move_to_end(key)
        stored = [key for key in keys[hit_chunks:] if key not in self.cache]
        for key in keys[hit_chunks:]:
            self.cache[key] = None
            self.cache.move_to_end(key)
        evicted = []
        while len(self.cache) > self.capacity:
            evicted.append(self.cache.popitem(last=False)[0])
        if evicted:
            self.publisher.evicted(evicted, "l1")
        stored = [key for key in stored if key in self.cache]
        if stored:
            self.publisher.stored(stored, "l1")


@dataclass
class _Result:
    policy: str
    requests: int = 0
    prompt_tokens: int = 0
    hit_tokens: int = 0
    predicted_hit_tokens: int = 0
    ttfts: list[float] = field(default_factory=list)
    per_worker: list[int] = field(default_factory=list)
    stale_decisions: int = 0
    wall_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {
            **policy_figures(self.hit_tokens, self.prompt_tokens, self.ttfts, self.per_worker),
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "hit_tokens": self.hit_tokens,
            "predicted_hit_tokens": self.predicted_hit_tokens,
            "stale_decisions": self.stale_decisions,
            "wall_s": self.wall_s,
        }


def _rendezvous(prefix: bytes, workers: list[_Worker]) -> _Worker:
    # The same hash as proxy/routing.py's prefix_aware: xxh64(prefix, seed=xxh64(worker name)).
    return max(
        workers,
        key=lambda w: xxhash.xxh64_intdigest(prefix, seed=xxhash.xxh64_intdigest(w.name.encode())),
    )


def _simulate(
    s: BenchSettings,
    policy: str,
    system: list[int],
    contexts: list[list[int]],
    users: list[list[_Turn]],
) -> _Result:
    fingerprint = LayoutFingerprint(
        model="simulated", dtype="bfloat16", num_layers=32, num_kv_heads=8, head_dim=128,
        chunk_size=s.chunk_size, tp_rank=0, tp_size=1,
    )  # fmt: skip
    root = chain_root(fingerprint)
    publishers = [
        KVEventPublisher(
            PublisherSettings("tcp://127.0.0.1:0", batch_interval=0.001, heartbeat_interval=0.5),
            fingerprint,
            publisher_id=f"sim-d{i}",
        ).start()
        for i in range(s.workers)
    ]
    workers = [_Worker(f"d{i}", s.cache_chunks, pub) for i, pub in enumerate(publishers)]
    index = KVIndex()
    subscriber = KVEventSubscriber(
        [EventSource(w.name, w.publisher.endpoint, w.publisher.snapshot_endpoint) for w in workers],
        index,
        poll_interval=0.001,
    ).start()
    settings = CacheAwareSettings(skip_prefill_chunks=None)
    cache_aware = CacheAwarePolicy(index, settings)
    result = _Result(policy)
    rr = [0]

    def synced() -> bool:
        return all(
            w.publisher.idle() and subscriber.synced(w.name, w.publisher.sequence) for w in workers
        )

    def pick(tokens: list[int], keys: list[bytes], now: float) -> tuple[_Worker, int]:
        loads = {w.name: w.outstanding(now) for w in workers}
        if policy == "round_robin":
            chosen = workers[rr[0] % len(workers)]
            rr[0] += 1
            return chosen, 0
        if policy == "prefix_aware":
            return _rendezvous(prefix_key({"prompt": tokens}), workers), 0
        if policy == "oracle":
            cands = [
                Candidate(
                    w.name, loads[w.name], min(w.cached_chunks(keys) * s.chunk_size, len(tokens))
                )
                for w in workers
            ]
            choice = choose(cands, len(tokens), settings, keys[-1])
            assert choice is not None
            return next(w for w in workers if w.name == choice.name), choice.cached_tokens
        deadline = time.monotonic() + _SYNC_DEADLINE
        while not synced():
            if time.monotonic() > deadline:
                result.stale_decisions += 1
                break
            time.sleep(0.0002)
        plan = cache_aware.plan(tokens, [(w.name, loads[w.name]) for w in workers], [])
        assert plan is not None
        return next(w for w in workers if w.name == plan.decode), plan.predicted_decode_hit_tokens

    started = time.monotonic()
    try:
        deadline = time.monotonic() + 10
        while not all(subscriber.synced(w.name) for w in workers):
            if time.monotonic() > deadline:
                raise TimeoutError("the subscriber did not sync with the simulated workers")
            time.sleep(0.005)
        rng = random.Random(s.seed + 1)
        history: list[list[int]] = [list(context) for context in contexts]
        arrivals: list[tuple[float, int, int]] = [
            (rng.uniform(0, s.think_s), u, 0) for u in range(len(users))
        ]
        heapq.heapify(arrivals)
        while arrivals:
            now, u, r = heapq.heappop(arrivals)
            turn = users[u][r]
            tokens = system + history[u] + turn.question
            keys = chunk_keys(root, tokens, s.chunk_size)
            worker, predicted = pick(tokens, keys, now)
            hit_chunks = worker.cached_chunks(keys)
            hit = min(hit_chunks * s.chunk_size, len(tokens))
            worker.admit(keys, hit_chunks)
            prefill_s = s.fixed_ms / 1e3 + (len(tokens) - hit) * s.prefill_us_per_token / 1e6
            start = max(now, worker.prefill_free_at)
            worker.prefill_free_at = start + prefill_s
            worker.busy_s += prefill_s
            worker.requests += 1
            first_token = start + prefill_s
            end = first_token + len(turn.answer) * s.decode_ms_per_token / 1e3
            worker.inflight.append((end, len(tokens)))  # the proxy counts prompt tokens
            result.requests += 1
            result.prompt_tokens += len(tokens)
            result.hit_tokens += hit
            result.predicted_hit_tokens += predicted
            result.ttfts.append(first_token - now)
            history[u] = history[u] + turn.question + turn.answer
            if r + 1 < s.rounds:
                heapq.heappush(arrivals, (end + rng.uniform(0.5, 1.5) * s.think_s, u, r + 1))
    finally:
        subscriber.close()
        for pub in publishers:
            pub.close()
    result.per_worker = [w.requests for w in workers]
    result.wall_s = time.monotonic() - started
    return result


def run(s: BenchSettings, policies: Sequence[str] = POLICIES) -> dict[str, Any]:
    s.validate()
    system, contexts, users = _workload(s)
    final_tokens = [
        len(system) + len(c) + sum(len(t.question) + len(t.answer) for t in turns)
        for c, turns in zip(contexts, users, strict=True)
    ]
    working_set = len(system) // s.chunk_size + sum(
        (n - len(system)) // s.chunk_size + s.rounds for n in final_tokens
    )
    results = {p: _simulate(s, p, system, contexts, users).summary() for p in policies}
    out: dict[str, Any] = {
        "bench": "routing",
        "simulated_workers": True,
        "note": "simulated D workers (LRU chunk caches, virtual-time TTFT model); real KV events, "
        "subscriber, index and policy code",
        "settings": asdict(s),
        "working_set_chunks": working_set,
        "cache_chunks_per_worker": s.cache_chunks,
        "results": results,
    }
    if "cache_aware" in results and "oracle" in results and results["oracle"]["hit_rate"] > 0:
        out["cache_aware_vs_oracle_hit_rate"] = (
            results["cache_aware"]["hit_rate"] / results["oracle"]["hit_rate"]
        )
    return out


def tokenize_cost(tokenizer_dir: str, s: BenchSettings) -> dict[str, float]:
    """Microseconds per chat request for the proxy's tokenization plus chunk keys, on the model's
    tokenizer: the same multi-round conversations as text (synthetic words), cold and repeated."""
    from lmcache_disagg.proxy.tokenizer import PromptTokenizer

    tokenizer = PromptTokenizer.from_dir(tokenizer_dir)
    rng = random.Random(s.seed)
    words = ["river", "cache", "prefill", "decode", "token", "valley", "engineer", "network"]

    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    system = {"role": "system", "content": text(s.system_tokens)}
    bodies = []
    for _ in range(s.users):
        messages = [system, {"role": "user", "content": text(s.user_context_tokens)}]
        for _ in range(s.rounds):
            messages = [*messages, {"role": "user", "content": text(s.question_tokens[1])}]
            bodies.append({"messages": messages})
            messages = [*messages, {"role": "assistant", "content": text(s.answer_tokens[1])}]
    fingerprint = LayoutFingerprint(
        model="simulated", dtype="bfloat16", num_layers=32, num_kv_heads=8, head_dim=128,
        chunk_size=256, tp_rank=0, tp_size=1,
    )  # fmt: skip
    root = chain_root(fingerprint)
    out: dict[str, float] = {}
    tokens = 0
    for label in ("cold", "repeated"):
        t0 = time.perf_counter()
        for body in bodies:
            ids = tokenizer.request_tokens(body)
            assert ids is not None
            chunk_keys(root, ids, 256)
            tokens += len(ids) if label == "cold" else 0
        out[f"{label}_us_per_request"] = (time.perf_counter() - t0) / len(bodies) * 1e6
    out["mean_prompt_tokens"] = tokens / len(bodies)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lmcache-disagg bench routing --simulate", description=__doc__
    )
    d = BenchSettings()
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.add_argument("--users", type=int, default=d.users)
    parser.add_argument("--rounds", type=int, default=d.rounds)
    parser.add_argument("--system-tokens", type=int, default=d.system_tokens)
    parser.add_argument(
        "--user-context-tokens",
        type=int,
        default=d.user_context_tokens,
        help="per-user context before the first question (LMCache's user info)",
    )
    parser.add_argument(
        "--question-tokens", type=parse_range, default=d.question_tokens, metavar="LO,HI"
    )
    parser.add_argument(
        "--answer-tokens", type=parse_range, default=d.answer_tokens, metavar="LO,HI"
    )
    parser.add_argument("--think-s", type=float, default=d.think_s)
    parser.add_argument("--workers", type=int, default=d.workers, help="simulated D workers")
    parser.add_argument(
        "--cache-chunks", type=int, default=d.cache_chunks, help="LRU chunk cache per worker"
    )
    parser.add_argument("--chunk-size", type=int, default=d.chunk_size)
    parser.add_argument("--fixed-ms", type=float, default=d.fixed_ms)
    parser.add_argument("--prefill-us-per-token", type=float, default=d.prefill_us_per_token)
    parser.add_argument("--decode-ms-per-token", type=float, default=d.decode_ms_per_token)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument(
        "--tokenizer",
        metavar="DIR",
        help="also time the proxy's tokenization of the workload as chats",
    )
    args = parser.parse_args(argv)  # fmt: skip
    policies = [p for p in args.policies.split(",") if p]
    unknown = sorted(set(policies) - set(POLICIES))
    if unknown:
        parser.error(f"unknown policies {unknown}; choose from {', '.join(POLICIES)}")
    settings = BenchSettings(
        users=args.users, rounds=args.rounds, system_tokens=args.system_tokens,
        user_context_tokens=args.user_context_tokens,
        question_tokens=args.question_tokens, answer_tokens=args.answer_tokens,
        think_s=args.think_s, workers=args.workers, cache_chunks=args.cache_chunks,
        chunk_size=args.chunk_size, fixed_ms=args.fixed_ms,
        prefill_us_per_token=args.prefill_us_per_token,
        decode_ms_per_token=args.decode_ms_per_token, seed=args.seed,
    )  # fmt: skip
    try:
        out = run(settings, policies)
    except ValueError as exc:
        parser.error(str(exc))
    if args.tokenizer:
        out["tokenize"] = tokenize_cost(args.tokenizer, settings)
    print(f"SIMULATED workers: {out['note']}")
    print(
        f"{settings.users} users x {settings.rounds} rounds, {settings.workers} D's, "
        f"{settings.cache_chunks} chunks of cache each; working set {out['working_set_chunks']} chunks"
    )
    print(f"{'policy':<14}{'hit rate':>10}{'mean TTFT':>12}{'p90 TTFT':>12}{'imbalance':>11}")
    for name, row in out["results"].items():
        print(
            f"{name:<14}{row['hit_rate']:>10.3f}{row['mean_ttft_ms']:>10.1f}ms"
            f"{row['p90_ttft_ms']:>10.1f}ms{row['load_imbalance']:>11.2f}"
        )
    if "cache_aware_vs_oracle_hit_rate" in out:
        print(f"cache_aware / oracle hit rate: {out['cache_aware_vs_oracle_hit_rate']:.3f}")
    if "tokenize" in out:
        t = out["tokenize"]
        print(
            f"proxy tokenization + chunk keys: {t['cold_us_per_request']:.0f} us/request cold, "
            f"{t['repeated_us_per_request']:.0f} us repeated ({t['mean_prompt_tokens']:.0f} tokens)"
        )
    if args.json:
        print(json.dumps(out))
    sys.stdout.flush()
    return 0
