"""Routing policies, the circuit breaker, and conditional disaggregation."""

from __future__ import annotations

from collections import Counter

from lmcache_disagg import kv_params
from lmcache_disagg.proxy.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
from lmcache_disagg.proxy.routing import Router
from lmcache_disagg.proxy.settings import WorkerSpec
from lmcache_disagg.proxy.workers import WorkerPool
from tests.proxy.utils import Cluster, completion


def _served_by(cluster: Cluster, names: tuple[str, ...]) -> Counter[str]:
    return Counter({n: len(cluster[n].requests()) for n in names})


def test_round_robin_alternates_over_p_and_d(cluster: Cluster) -> None:
    proxy = cluster.proxy(prefill=["p0", "p1"], decode=["d0", "d1"])
    seen = [proxy.post("/v1/completions", completion()).json()["system_fingerprint"]
            for _ in range(6)]  # fmt: skip
    assert Counter(seen) == {cluster["d0"].fingerprint: 3, cluster["d1"].fingerprint: 3}
    assert _served_by(cluster, ("p0", "p1")) == {"p0": 3, "p1": 3}


def test_prefix_aware_keeps_a_prefix_on_one_d(cluster: Cluster) -> None:
    proxy = cluster.proxy(prefill=["p0", "p1"], decode=["d0", "d1"],
                          extra=["--policy", "prefix_aware"])  # fmt: skip
    homes: dict[str, set[str]] = {}
    for i in range(12):
        prompt = f"conversation {i % 4} " + "shared system prompt " * 20
        fp = proxy.post("/v1/completions", completion(prompt)).json()["system_fingerprint"]
        homes.setdefault(prompt, set()).add(fp)
    assert all(len(ds) == 1 for ds in homes.values())
    # Different prefixes spread over both D (rendezvous hashing over 4 prefixes and 2 D).
    many = {proxy.post("/v1/completions", completion(f"topic {i} and more")).json()
            ["system_fingerprint"] for i in range(16)}  # fmt: skip
    assert len(many) == 2


def test_least_loaded_prefers_worker_with_fewer_outstanding_tokens() -> None:
    pool = WorkerPool(breaker_threshold=3, breaker_cooldown=5)
    a = pool.add(WorkerSpec("decode", "127.0.0.1:1", "127.0.0.1:2"))
    b = pool.add(WorkerSpec("decode", "127.0.0.1:3", "127.0.0.1:4"))
    a.healthy = b.healthy = True
    router = Router(pool, "least_loaded")
    a.outstanding_tokens = 5000
    assert all(router.pick("decode", b"") is b for _ in range(5))
    b.outstanding_tokens = 9000
    assert router.pick("decode", b"") is a
    b.breaker.record_failure()
    b.outstanding_tokens = 0
    assert router.pick("decode", b"", exclude=[a]) is b
    b.healthy = False
    assert router.pick("decode", b"", exclude=[a]) is None


def test_least_loaded_end_to_end_avoids_busy_decoder(cluster: Cluster) -> None:
    import threading

    proxy = cluster.proxy(decode=["d0", "d1"], extra=["--policy", "least_loaded"])
    cluster["d0"].set("slow", slow_delay=0.05)
    cluster["d1"].set("slow", slow_delay=0.05)
    # A long request occupies one D; the short ones that follow go to the other.
    long = threading.Thread(target=lambda: proxy.post("/v1/completions", completion(max_tokens=40)))
    long.start()
    from tests.proxy.utils import wait_for

    assert wait_for(lambda: cluster["d0"].log()["inflight"] + cluster["d1"].log()["inflight"] == 1)
    busy = "d0" if cluster["d0"].log()["inflight"] else "d1"
    idle = "d1" if busy == "d0" else "d0"
    for _ in range(3):
        fp = proxy.post("/v1/completions", completion(max_tokens=2)).json()["system_fingerprint"]
        assert fp == cluster[idle].fingerprint
    long.join(10)


def test_breaker_states() -> None:
    now = [0.0]
    breaker = CircuitBreaker(threshold=2, cooldown=10, clock=lambda: now[0])
    breaker.record_failure()
    assert breaker.state == CLOSED and breaker.available()
    breaker.record_failure()
    assert breaker.state == OPEN and not breaker.available()
    now[0] = 10.0
    assert breaker.available()
    breaker.acquire()
    assert breaker.state == HALF_OPEN and not breaker.available()  # one trial at a time
    breaker.record_failure()
    assert breaker.state == OPEN
    now[0] = 20.0
    breaker.acquire()
    breaker.record_success()
    assert breaker.state == CLOSED and breaker.available()


def test_conditional_disaggregation_short_prompts_skip_p(cluster: Cluster) -> None:
    proxy = cluster.proxy(extra=["--local-prefill-threshold", "32"])
    short = proxy.post("/v1/completions", completion("tiny prompt"))
    assert short.status_code == 200
    assert cluster["p0"].requests() == []
    assert kv_params.KV_TRANSFER_PARAMS not in cluster["d0"].requests()[-1]["body"]
    long_prompt = "a much longer prompt " * 20  # ~100 estimated tokens
    assert proxy.post("/v1/completions", completion(long_prompt)).status_code == 200
    assert len(cluster["p0"].requests()) == 1
    assert kv_params.KV_TRANSFER_PARAMS in cluster["d0"].requests()[-1]["body"]
    # Token-id prompts are counted exactly.
    assert proxy.post("/v1/completions", completion(list(range(40)))).status_code == 200
    assert len(cluster["p0"].requests()) == 2
    assert proxy.metric("lmcache_proxy_fallbacks_total", reason="short_prompt") == 1


def test_batch_prompts_run_on_d_alone(cluster: Cluster) -> None:
    """vLLM turns a list of prompts into one engine request each, all sharing one
    kv_transfer_params; the proxy must not disaggregate them as if they were one prompt."""
    proxy = cluster.proxy()
    before = len(cluster["p0"].requests()) + len(cluster["p1"].requests())
    batch = proxy.post("/v1/completions", completion(["first prompt " * 30, "second " * 40]))
    assert batch.status_code == 200, batch.text
    assert len(cluster["p0"].requests()) + len(cluster["p1"].requests()) == before
    d_body = (cluster["d0"].requests() + cluster["d1"].requests())[-1]["body"]
    assert kv_params.KV_TRANSFER_PARAMS not in d_body
    assert d_body["prompt"] == ["first prompt " * 30, "second " * 40]
    assert proxy.metric("lmcache_proxy_fallbacks_total", reason="batch_prompt") == 1
    # A single prompt in a list, as text or token ids, is still one PD pair.
    for prompt in (["one prompt " * 30], [list(range(60))]):
        assert proxy.post("/v1/completions", completion(prompt)).status_code == 200
    assert len(cluster["p0"].requests()) + len(cluster["p1"].requests()) == before + 2
