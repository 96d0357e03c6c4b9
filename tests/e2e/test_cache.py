"""The tiered chunk store on real vLLM (CPU): reuse from L1, L2 and L3, PD with reuse, faults.

One module-scoped run shares a few servers (each takes about a minute to start):

1. a plain vLLM (no connector) computes every prompt: the reference outputs;
2. ``kv_both`` worker W1, vLLM prefix caching off, all three tiers (RAM, a disk directory, a real
   ``redis-server``): reuse of a shared 1,000-token prefix and of a repeated prompt from L1;
3. W2 on the same disk directory after W1 stopped, RAM tier off: reuse from L2 alone; then every
   file is corrupted and a request over it recomputes (a counted fault), output unchanged;
4. W3, a fresh worker sharing the Redis (no disk, vLLM prefix caching on, few KV blocks): reuse
   from L3 alone, and from L1 after other traffic evicted the prefix from vLLM's own cache; it is
   also the decode worker of a PD pair whose P (prefix caching off) has its own store: P's second
   request over a shared prefix loads that prefix from P's store and computes only the new chunks.

Every output is token-identical to the plain run, and afterwards every pin, lease and pending
load is back to 0.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lmcache_disagg.config import LMCacheDisaggConfig
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

pytestmark = pytest.mark.timeout(1800)

BLOCK = 32
MAX_TOKENS = 8
EXTERNAL = "vllm:prompt_tokens_by_source_total"
COMMON_ARGS = ("--block-size", str(BLOCK))
NO_PREFIX_CACHING = ("--no-enable-prefix-caching",)
# W3: few KV blocks, so other traffic evicts a prefix from vLLM's own prefix cache.
W3_BLOCKS = 160
W3_MAX_LEN = 2048


def prompt(*parts: tuple[int, int]) -> list[int]:
    out: list[int] = []
    for length, seed in parts:
        out += token_prompt(length, seed)
    return out


PREFIX = (1000, 101)
PREFIX_PD = 1000
PROMPTS: dict[str, list[int]] = {
    "shared-a": prompt(PREFIX, (200, 102)),
    "shared-b": prompt(PREFIX, (300, 103)),
    "repeat": prompt((700, 104)),
    "l2": prompt((900, 105)),
    "fault": prompt((800, 106)),
    "l3": prompt((600, 107)),
    "evict-a": prompt((1000, 108), (100, 109)),
    "evict-b": prompt((1000, 108), (150, 110)),
    "pd-a": prompt((PREFIX_PD, 111), (120, 112)),
    "pd-b": prompt((PREFIX_PD, 111), (260, 113)),
    "poke": prompt((1, 114)),
}
FILLERS = [prompt((1500, 120 + i)) for i in range(4)]


def spec_of(name: str, tokens: list[int]) -> Spec:
    body = {"prompt": tokens, "max_tokens": MAX_TOKENS, "temperature": 0}
    return Spec(name, "completions", body, False, len(tokens))


@dataclass
class Sent:
    """One request: its output and how vLLM says its prompt tokens were obtained."""

    result: Result
    external: float
    local_compute: float
    local_cache_hit: float


@dataclass
class CacheRun:
    reference: dict[str, Result] = field(default_factory=dict)
    sent: dict[str, Sent] = field(default_factory=dict)
    metrics: dict[str, str] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)
    drained: dict[str, bool] = field(default_factory=dict)
    served_after_fault: bool = False
    pushed: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Per PD request: (bytes P sent, tokens P pushed), from P's counters."""


def send(server: VLLMServer, model: str, name: str, tokens: list[int], base: str = "") -> Sent:
    """Send one prompt; wait until vLLM's per-source prompt counters account for all of it."""
    before = scrape(server)

    def sources(text: str) -> tuple[float, float, float]:
        return tuple(  # type: ignore[return-value]
            metric_sum(text, EXTERNAL, source=s) - metric_sum(before, EXTERNAL, source=s)
            for s in ("external_kv_transfer", "local_compute", "local_cache_hit")
        )

    result = run_spec(base or server.url, model, spec_of(name, tokens))
    assert wait_for(lambda: sum(sources(scrape(server))) >= len(tokens), 30)
    ext, local, hit = sources(scrape(server))
    return Sent(result, ext, local, hit)


def drain(server: VLLMServer, model: str) -> tuple[bool, str]:
    """Pins, leases and pending loads back to 0 (gauges are reported on engine steps: poke)."""
    poke = spec_of("poke", PROMPTS["poke"])

    def empty() -> bool:
        run_spec(server.url, model, poke)
        text = scrape(server)
        return (
            metric_sum(text, "lmcache_disagg_cache_pinned_chunks") == 0
            and metric_sum(text, "lmcache_disagg_cache_leases") == 0
            and metric_sum(text, "lmcache_disagg_cache_pending_loads") == 0
            and metric_sum(text, "lmcache_disagg_pending_loads") == 0
            and metric_sum(text, "lmcache_disagg_pool_pages_used") == 0
        )

    ok = wait_for(empty, 60, interval=0.5)
    return ok, scrape(server)


class Redis:
    """A real ``redis-server`` on a free loopback port, no persistence."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        assert binary is not None, "redis-server is required (apt-get install redis-server)"
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port)
        assert wait_for(lambda: self._ping(client), 20), "redis-server did not start"
        client.close()

    @staticmethod
    def _ping(client: object) -> bool:
        import redis

        try:
            return bool(client.ping())  # type: ignore[attr-defined]
        except redis.RedisError:
            return False

    def stop(self) -> None:
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout=10)


def worker(
    model_dir: Path, log: Path, core: int, extra: Mapping[str, object], args: tuple[str, ...],
    role: str = "kv_both", max_len: int = 4096,
) -> VLLMServer:  # fmt: skip
    config = {"channel": "tcp", "listen_port": free_port(), **FAST_TIMEOUTS, **extra}
    return VLLMServer(
        VLLMServerSpec(
            model_dir=str(model_dir),
            cpu_core=core,
            kv_transfer_config=connector_config(role, **config),
            extra_args=(*COMMON_ARGS, *args),
            max_model_len=max_len,
        ),
        log,
    )


def corrupt_every_file(directory: Path) -> int:
    """Flip the last byte of every chunk file (the checksum catches it on read)."""
    count = 0
    for path in directory.iterdir():
        if path.is_file() and path.stat().st_size > 0:
            with path.open("r+b") as handle:
                handle.seek(-1, os.SEEK_END)
                last = handle.read(1)
                handle.seek(-1, os.SEEK_END)
                handle.write(bytes([last[0] ^ 0xFF]))
            count += 1
    return count


@pytest.fixture(scope="module")
def cache_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CacheRun]:
    root = tmp_path_factory.mktemp("cache")
    model = str(tiny_model_dir)
    run = CacheRun()
    disk = root / "disk"
    disk.mkdir()
    # 1. The reference: plain vLLM, the same block size.
    plain = VLLMServer(
        VLLMServerSpec(model_dir=model, cpu_core=0, extra_args=COMMON_ARGS), root / "plain.log"
    )
    try:
        plain.start()
        for name, tokens in [*PROMPTS.items()]:
            run.reference[name] = run_spec(plain.url, model, spec_of(name, tokens))
    finally:
        plain.stop()
    redis_server = Redis(root)
    try:
        all_tiers = {"local_disk": str(disk), "remote_url": redis_server.url}
        # 2. W1: every tier, vLLM's prefix caching off.
        w1 = worker(tiny_model_dir, root / "w1.log", 0, all_tiers, NO_PREFIX_CACHING)
        run.logs["w1"] = w1.log_path
        try:
            w1.start()
            for name in ("shared-a", "shared-b", "repeat"):
                run.sent[f"w1-{name}"] = send(w1, model, name, PROMPTS[name])
            run.sent["w1-repeat-again"] = send(w1, model, "repeat", PROMPTS["repeat"])
            for name in ("l2", "fault", "l3"):
                run.sent[f"w1-{name}"] = send(w1, model, name, PROMPTS[name])
            run.drained["w1"], run.metrics["w1"] = drain(w1, model)
        finally:
            w1.stop()  # flushes the write-through to disk and Redis
        # 3. W2: the same disk directory, no RAM tier, no Redis.
        w2 = worker(
            tiny_model_dir, root / "w2.log", 0, {"local_cpu": False, "local_disk": str(disk)},
            NO_PREFIX_CACHING,
        )  # fmt: skip
        run.logs["w2"] = w2.log_path
        try:
            w2.start()
            run.sent["w2-l2"] = send(w2, model, "l2", PROMPTS["l2"])
            assert corrupt_every_file(disk) > 0
            run.sent["w2-fault"] = send(w2, model, "fault", PROMPTS["fault"])
            run.sent["w2-after-fault"] = send(w2, model, "shared-a", PROMPTS["shared-a"])
            run.drained["w2"], run.metrics["w2"] = drain(w2, model)
        finally:
            w2.stop()
        # 4. W3 (fresh, Redis only below its RAM; prefix caching on, few blocks) and a P.
        w3 = worker(
            tiny_model_dir, root / "w3.log", 1, {"remote_url": redis_server.url},
            ("--num-gpu-blocks-override", str(W3_BLOCKS)), max_len=W3_MAX_LEN,
        )  # fmt: skip
        kv = w3.spec.kv_transfer_config
        assert kv is not None
        d_kv = f"127.0.0.1:{kv['kv_connector_extra_config']['listen_port']}"
        # P without vLLM's prefix caching: its reuse must come from its own store.
        p = worker(tiny_model_dir, root / "p.log", 0, {}, NO_PREFIX_CACHING, role="kv_producer")
        run.logs["w3"], run.logs["p"] = w3.log_path, p.log_path
        proxy: Proxy | None = None
        try:
            start_servers(w3, p)
            run.sent["w3-l3"] = send(w3, model, "l3", PROMPTS["l3"])
            run.sent["w3-evict-a"] = send(w3, model, "evict-a", PROMPTS["evict-a"])
            for index, filler in enumerate(FILLERS):
                send(w3, model, f"filler-{index}", filler)
            run.sent["w3-evict-b"] = send(w3, model, "evict-b", PROMPTS["evict-b"])
            proxy = Proxy(p.address, f"{w3.address},kv={d_kv}", root / "proxy.log").wait_ready()
            for name in ("pd-a", "pd-b"):
                before = scrape(p)
                run.sent[f"p-{name}"] = send(p, model, name, PROMPTS[name], base=proxy.url)
                assert wait_for(lambda b=before: min(pushed(scrape(p), b)) > 0, 30)
                run.pushed[name] = pushed(scrape(p), before)
            run.drained["w3"], run.metrics["w3"] = drain(w3, model)
            run.drained["p"], run.metrics["p"] = drain(p, model)
        finally:
            if proxy is not None:
                proxy.stop()
            w3.stop()
            p.stop()
    finally:
        redis_server.stop()
    yield run


def pushed(text: str, before: str) -> tuple[float, float]:
    """(bytes sent, tokens pushed) by P between two scrapes (counted once a push settled)."""
    return tuple(  # type: ignore[return-value]
        metric_sum(text, name) - metric_sum(before, name)
        for name in ("lmcache_disagg_bytes_sent_total", "lmcache_disagg_tokens_pushed_total")
    )


def same(run: CacheRun, key: str, name: str) -> None:
    assert run.sent[key].result.key() == run.reference[name].key(), key


def test_kv_both_reuses_a_shared_prefix_from_l1_beyond_whole_chunks(cache_run: CacheRun) -> None:
    first, second = cache_run.sent["w1-shared-a"], cache_run.sent["w1-shared-b"]
    assert first.external == 0
    # All but at most one block of the 1,000-token prefix (whole-chunk matching: 768).
    assert 1000 - BLOCK <= second.external <= 1000
    assert second.local_compute == len(PROMPTS["shared-b"]) - second.external
    same(cache_run, "w1-shared-a", "shared-a")
    same(cache_run, "w1-shared-b", "shared-b")
    assert metric_sum(cache_run.metrics["w1"], "lmcache_disagg_cache_hits_total", tier="l1") > 0


def test_the_same_prompt_twice_loads_all_but_the_last_token(cache_run: CacheRun) -> None:
    assert cache_run.sent["w1-repeat"].external == 0
    again = cache_run.sent["w1-repeat-again"]
    assert again.external == len(PROMPTS["repeat"]) - 1
    assert again.local_compute == 1
    same(cache_run, "w1-repeat-again", "repeat")


def test_reuse_from_l2_alone_after_a_restart(cache_run: CacheRun) -> None:
    sent = cache_run.sent["w2-l2"]
    assert sent.external == len(PROMPTS["l2"]) - 1
    same(cache_run, "w2-l2", "l2")
    text = cache_run.metrics["w2"]
    assert metric_sum(text, "lmcache_disagg_cache_hits_total", tier="l2") > 0
    assert metric_sum(text, "lmcache_disagg_cache_hits_total", tier="l1") == 0


def test_a_corrupted_disk_file_is_a_miss_and_recomputed(cache_run: CacheRun) -> None:
    same(cache_run, "w2-fault", "fault")
    text = cache_run.metrics["w2"]
    assert metric_sum(text, "lmcache_disagg_cache_faults_total", tier="l2", reason="checksum") > 0
    failures = "lmcache_disagg_cache_load_failures_total"
    assert metric_sum(text, failures, reason="checksum") > 0
    assert metric_sum(text, "lmcache_disagg_cache_tokens_loaded_total") == len(PROMPTS["l2"]) - 1
    # ... and the worker keeps serving.
    same(cache_run, "w2-after-fault", "shared-a")


def test_reuse_from_l3_alone_on_a_fresh_worker(cache_run: CacheRun) -> None:
    sent = cache_run.sent["w3-l3"]
    assert sent.external == len(PROMPTS["l3"]) - 1
    same(cache_run, "w3-l3", "l3")
    text = cache_run.metrics["w3"]
    assert metric_sum(text, "lmcache_disagg_cache_hits_total", tier="l3") > 0
    assert metric_sum(text, "lmcache_disagg_cache_promotions_total", tier="l3") > 0


def test_with_prefix_caching_on_an_evicted_prefix_is_served_from_l1(cache_run: CacheRun) -> None:
    sent = cache_run.sent["w3-evict-b"]
    # vLLM's own prefix cache lost it (the fillers needed every block) ...
    assert sent.local_cache_hit < 1000 - BLOCK
    # ... and the store served it: vLLM's hit plus ours cover all but at most one block.
    assert sent.external > 0
    assert sent.external + sent.local_cache_hit >= 1000 - BLOCK
    same(cache_run, "w3-evict-a", "evict-a")
    same(cache_run, "w3-evict-b", "evict-b")


def test_pd_second_request_computes_only_the_new_chunks_on_p(cache_run: CacheRun) -> None:
    first, second = cache_run.sent["p-pd-a"], cache_run.sent["p-pd-b"]
    # The P leg is the proxy's max_tokens=1 prefill; P's counters are what ``send`` scraped.
    assert first.external == 0
    assert second.external >= 1000 - BLOCK
    assert second.local_compute <= len(PROMPTS["pd-b"]) - (1000 - BLOCK)
    same(cache_run, "p-pd-a", "pd-a")
    same(cache_run, "p-pd-b", "pd-b")


def test_pd_second_request_pushes_only_the_chunks_d_lacks(cache_run: CacheRun) -> None:
    (bytes_a, tokens_a), (bytes_b, tokens_b) = cache_run.pushed["pd-a"], cache_run.pushed["pd-b"]
    per_token = bytes_a / tokens_a  # the first push sent every chunk
    assert bytes_a > 0 and tokens_a > 0
    chunk = LMCacheDisaggConfig().chunk_size
    shared = (PREFIX_PD // chunk) * chunk  # whole chunks of the shared prefix D already holds
    assert 0 < bytes_b <= (tokens_b - shared) * per_token
    same(cache_run, "p-pd-b", "pd-b")


def test_pins_leases_and_pools_drain_to_zero(cache_run: CacheRun) -> None:
    assert cache_run.drained == {"w1": True, "w2": True, "w3": True, "p": True}
    for text in cache_run.metrics.values():
        assert "lmcache_disagg_cache_pinned_chunks" in text
