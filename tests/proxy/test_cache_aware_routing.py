"""--policy cache_aware end to end on stub workers that keep chunk caches and publish KV events."""

from __future__ import annotations

import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from lmcache_disagg.bench.cluster import Proc, free_port, free_port_pair, start_stub, wait_http
from tests.proxy.utils import Cluster, ProxyHandle, Stub, sse_events, wait_for

PROMPT = "The river ran quietly through the valley, past farms, mills and small towns. " * 6


@pytest.fixture
def cache_cluster(tmp_path: Path, tiny_model_dir: Path) -> Iterator[tuple[Cluster, dict[str, str]]]:
    stubs: dict[str, Stub] = {}
    events: dict[str, str] = {}
    procs: list[Proc] = []
    try:
        for name in ("p0", "d0", "d1"):
            port, events_port = free_port(), free_port_pair()
            role = "prefill" if name.startswith("p") else "decode"
            endpoint = f"tcp://127.0.0.1:{events_port}"
            # --model: /v1/models names the local model directory, where the proxy finds the
            # tokenizer without --tokenizer.
            extra = ["--kv-events", endpoint, "--tokenizer", str(tiny_model_dir),
                     "--model", str(tiny_model_dir)]  # fmt: skip
            proc = start_stub(role, port, tmp_path, extra)
            procs.append(proc)
            stubs[name] = Stub(name, port, proc)
            events[name] = f"{stubs[name].addr}={endpoint}"
        for stub in stubs.values():
            wait_http(f"{stub.url}/health", proc=stub.proc)
        cluster = Cluster(stubs, tmp_path)
        try:
            yield cluster, events
        finally:
            cluster.stop_all()
    finally:
        for proc in procs:
            proc.stop()


def _chat(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": "stub-model", "max_tokens": 4,
            "messages": [{"role": "user", "content": text}], **extra}  # fmt: skip


def _cache_aware_flags(events: dict[str, str]) -> list[str]:
    # No snapshot endpoint given: the stubs' publishers bind the default, the events port + 1.
    flags = ["--policy", "cache_aware"]
    for name in ("p0", "d0", "d1"):
        flags += ["--kv-events", events[name]]
    return flags


def _holder(cluster: Cluster) -> str:
    (name,) = [n for n in ("d0", "d1") if cluster[n].requests()]
    return name


def test_second_request_goes_where_the_prefix_is_and_skips_p(
    cache_cluster: tuple[Cluster, dict[str, str]], tiny_model_dir: Path
) -> None:
    cluster, events = cache_cluster
    proxy = cluster.proxy(("p0",), ("d0", "d1"), _cache_aware_flags(events))
    assert wait_for(
        lambda: proxy.metric("lmcache_proxy_kv_event_sources", state="synced") == 3, timeout=15
    )
    assert "tokenizing with" in proxy.log_text()
    first = proxy.post("/v1/chat/completions", _chat(PROMPT))
    assert first.status_code == 200, first.text
    holder = next(n for n in ("d0", "d1") if cluster[n].requests())
    other = "d1" if holder == "d0" else "d0"
    assert len(cluster["p0"].requests()) == 1
    # The index learns what the holder stored; the same conversation goes back to it, without P.
    assert wait_for(lambda: proxy.metric("lmcache_proxy_kv_index_keys") > 0, timeout=10)
    second = proxy.post("/v1/chat/completions", _chat(PROMPT))
    assert second.status_code == 200 and second.json()["choices"] == first.json()["choices"]
    assert len(cluster[holder].requests()) == 2 and not cluster[other].requests()
    assert len(cluster["p0"].requests()) == 1, "D held all but the last chunk: P was skipped"
    assert proxy.metric("lmcache_proxy_cache_aware_decisions_total", reason="cached_on_decode") == 1
    predicted = proxy.metric("lmcache_proxy_predicted_hit_tokens_sum")
    actual = proxy.metric("lmcache_proxy_actual_hit_tokens_sum")
    assert predicted > 0 and actual == predicted, "the index was right"

    # Stale index: the holder silently drops its cache. The proxy still sends the conversation
    # there (it cannot know); the answer is the same, only the hit is gone, and the metrics show
    # the gap between predicted and actual hit tokens.
    cluster[holder].set(forget_cache=True)
    third = proxy.post("/v1/chat/completions", _chat(PROMPT))
    assert third.status_code == 200 and third.json()["choices"] == first.json()["choices"]
    assert len(cluster[holder].requests()) == 3
    assert proxy.metric("lmcache_proxy_predicted_hit_tokens_sum") > predicted
    assert proxy.metric("lmcache_proxy_actual_hit_tokens_sum") == actual


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--policy", "cache_aware", "--kv-events", "10.9.9.9:1=tcp://h:1"], "not a --prefill"),
        (["--policy", "cache_aware", "--kv-events", "auto:x"], "auto:PORT"),
        (["--kv-events", "auto"], "cache_aware only"),
        (["--policy", "cache_aware", "--skip-prefill-chunks", "-2"], "skip_prefill_chunks"),
    ],
)
def test_bad_cache_aware_flags_exit_2(flags: list[str], message: str) -> None:
    import subprocess
    import sys

    bad = subprocess.run(
        [sys.executable, "-m", "lmcache_disagg.proxy.cli", "--prefill", "127.0.0.1:1",
         "--decode", "127.0.0.1:2", "--port", "0", *flags],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr


def _same_time(text: str) -> str:
    return re.sub(r'"created":\d+', '"created":0', text)


def _timeless(events: list[Any]) -> list[Any]:
    return [{k: v for k, v in e.items() if k != "created"} for e in events]


def _stream(proxy: ProxyHandle, rid: str, **extra: Any) -> str:
    resp = proxy.post("/v1/chat/completions", _chat(PROMPT, stream=True, **extra),
                      headers={"X-Request-Id": rid})  # fmt: skip
    assert resp.status_code == 200, resp.text
    return resp.text


def test_streamed_answers_measure_actual_hits_and_keep_the_clients_stream(
    cache_cluster: tuple[Cluster, dict[str, str]],
) -> None:
    """A streamed answer's usage event feeds the actual-hit metric. A client that did not ask for
    usage still gets exactly the stream it asked for: the proxy asks D for the usage event and
    drops it again, so the bytes equal those of a run without cache_aware."""
    cluster, events = cache_cluster
    proxy = cluster.proxy(("p0",), ("d0", "d1"), _cache_aware_flags(events))
    assert wait_for(
        lambda: proxy.metric("lmcache_proxy_kv_event_sources", state="synced") == 3, timeout=15
    )
    first = _stream(proxy, "s-1")
    assert sse_events(first)[-1] == "[DONE]" and '"usage"' not in first
    holder = _holder(cluster)
    (d_req,) = cluster[holder].requests()
    assert d_req["body"]["stream_options"] == {"include_usage": True}, "asked for the client"
    assert proxy.metric("lmcache_proxy_actual_hit_tokens_count") == 1
    assert proxy.metric("lmcache_proxy_actual_hit_tokens_sum") == 0, "all of it was pushed"
    # The index learns the holder's chunks: the next stream goes there without P, and the hit it
    # really had (from the stripped usage event) is what the index predicted.
    assert wait_for(lambda: proxy.metric("lmcache_proxy_kv_index_keys") > 0, timeout=10)
    second = _stream(proxy, "s-2")
    assert '"usage"' not in second and len(cluster[holder].requests()) == 2
    assert len(cluster["p0"].requests()) == 1, "P skipped"
    assert proxy.metric("lmcache_proxy_actual_hit_tokens_count") == 2
    actual = proxy.metric("lmcache_proxy_actual_hit_tokens_sum")
    assert actual > 0 and actual == proxy.metric("lmcache_proxy_predicted_hit_tokens_sum")
    # A client that asked for usage gets the one usage event, D's report in it.
    asked = sse_events(_stream(proxy, "s-3", stream_options={"include_usage": True}))
    usage_events = [e for e in asked[:-1] if "usage" in e]
    assert asked[-1] == "[DONE]" and len(usage_events) == 1 and usage_events[0]["choices"] == []
    assert usage_events[0]["usage"]["prompt_tokens_details"]["cached_tokens"] == actual
    assert proxy.metric("lmcache_proxy_actual_hit_tokens_count") == 3
    assert proxy.metric("lmcache_proxy_actual_hit_tokens_sum") == 2 * actual
    # continuous_usage_stats without include_usage: the request reaches D as the client sent it.
    _stream(proxy, "s-4", stream_options={"continuous_usage_stats": True})
    assert cluster[holder].requests()[-1]["body"]["stream_options"] == {
        "continuous_usage_stats": True
    }
    assert proxy.metric("lmcache_proxy_actual_hit_tokens_count") == 3, "no usage came"

    # The same requests through a proxy without cache_aware: the same bytes (but the time).
    plain = cluster.proxy(("p0",), ("d0", "d1"))
    assert _same_time(_stream(plain, "s-1")) == _same_time(first)
    assert _same_time(_stream(plain, "s-2")) == _same_time(second)
    reference = sse_events(_stream(plain, "s-3", stream_options={"include_usage": True}))
    assert reference[-1] == "[DONE]" and _timeless(reference[:-2]) == _timeless(asked[:-2])


def test_every_process_of_a_multiprocess_proxy_routes_by_the_full_index(
    cache_cluster: tuple[Cluster, dict[str, str]],
) -> None:
    """--workers 2: each process subscribes to every worker's events itself, so requests on
    either process go to the D that holds the prefix."""
    cluster, events = cache_cluster
    proxy = cluster.proxy(("p0",), ("d0", "d1"), [*_cache_aware_flags(events), "--workers", "2"])
    # Counters add up over the processes: 6 resyncs = both processes synced all three sources.
    assert wait_for(lambda: proxy.metric("lmcache_proxy_kv_resyncs_total") >= 6, timeout=15)
    assert proxy.post("/v1/chat/completions", _chat(PROMPT)).status_code == 200
    holder = _holder(cluster)
    # P and the holder each published one stored event; both processes applied both.
    assert wait_for(lambda: proxy.metric("lmcache_proxy_kv_events_received_total") >= 4, timeout=10)
    # Request ids start with a per-process prefix. Both processes accept from one listening
    # socket, and which one takes a connection is up to the kernel: send concurrent batches (a
    # new connection each) until both have served some. At most 3 others in flight on one
    # process keep the holder's load term (0.25 x 217 tokens each) below the 208 cached tokens.
    processes: set[str] = set()
    with ThreadPoolExecutor(4) as pool:
        for _ in range(50):
            codes = pool.map(lambda _: proxy.post("/v1/chat/completions", _chat(PROMPT)), range(4))
            assert [c.status_code for c in codes] == [200] * 4
            processes = {r["request_id"].rpartition("-")[0] for r in cluster[holder].requests()[1:]}
            if len(processes) == 2:
                break
    assert len(processes) == 2, "both processes served requests"
    served = len(cluster[holder].requests())
    assert served > 1 and not cluster["d1" if holder == "d0" else "d0"].requests()
    assert len(cluster["p0"].requests()) == 1, "P skipped on both processes"


def test_a_worker_added_through_workers_is_followed_on_every_process(
    cache_cluster: tuple[Cluster, dict[str, str]],
) -> None:
    """POST /workers with kv_events: every process subscribes to the new D, routes the prefix it
    holds there (P skipped); DELETE drops it from every process's index."""
    cluster, events = cache_cluster
    admin = {"Authorization": "Bearer adm-kv-events"}
    flags = ["--policy", "cache_aware", "--kv-events", events["p0"], "--kv-events", events["d0"]]
    proxy = cluster.proxy(
        ("p0",),
        ("d0",),
        [*flags, "--workers", "2"],
        env={"LMCACHE_PROXY_ADMIN_KEY": "adm-kv-events"},
    )
    assert wait_for(
        lambda: proxy.metric("lmcache_proxy_kv_event_sources", state="synced") == 2, timeout=15
    )
    d1 = cluster["d1"].addr
    # d1 computed the conversation on its own before it joined: only its events can say so.
    primed = httpx.post(f"{cluster['d1'].url}/v1/chat/completions", json=_chat(PROMPT), timeout=10)
    assert primed.status_code == 200, primed.text
    bad = httpx.post(proxy.url + "/workers", headers=admin, timeout=5,
                     json={"role": "decode", "http": d1, "kv_events": "udp://x"})  # fmt: skip
    assert bad.status_code == 400 and "kv_events 'udp://x': expected tcp://" in bad.text
    endpoint = events["d1"].partition("=")[2]
    added = httpx.post(proxy.url + "/workers", headers=admin, timeout=5,
                       json={"role": "decode", "http": d1, "kv_events": endpoint})  # fmt: skip
    assert added.status_code == 200, added.text
    # livemax over the processes: the gauge is the largest of any process, so wait on requests.
    assert wait_for(
        lambda: proxy.metric("lmcache_proxy_kv_index_worker_keys", worker=d1) > 0, timeout=15
    )
    before_p = len(cluster["p0"].requests())
    processes: set[str] = set()
    sent = 0
    while len(processes) < 2 and sent < 60:  # a new connection each, until both processes served
        reply = proxy.post("/v1/chat/completions", _chat(PROMPT))
        assert reply.status_code == 200, reply.text
        sent += 1
        processes = {r["request_id"].rpartition("-")[0] for r in cluster["d1"].requests()[1:]}
    assert len(processes) == 2, "both processes followed d1's events"
    assert len(cluster["d1"].requests()) == 1 + sent and not cluster["d0"].requests()
    assert len(cluster["p0"].requests()) == before_p, "d1 held the prefix: P skipped"
    gone = httpx.request("DELETE", proxy.url + "/workers", headers=admin, timeout=5,
                         json={"role": "decode", "http": d1})  # fmt: skip
    assert gone.status_code == 200
    assert wait_for(
        lambda: proxy.metric("lmcache_proxy_kv_index_worker_keys", worker=d1) == 0, timeout=15
    )
    assert wait_for(
        lambda: proxy.metric("lmcache_proxy_kv_event_sources", state="synced") == 2, timeout=15
    )
    assert proxy.post("/v1/chat/completions", _chat(PROMPT)).status_code == 200
    assert len(cluster["d0"].requests()) == 1 and len(cluster["d1"].requests()) == 1 + sent
