"""--policy cache_aware end to end on stub workers that keep chunk caches and publish KV events."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lmcache_disagg.bench.cluster import Proc, free_port, start_stub, wait_http
from tests.proxy.utils import Cluster, Stub, wait_for

PROMPT = "The river ran quietly through the valley, past farms, mills and small towns. " * 6


@pytest.fixture
def cache_cluster(tmp_path: Path, tiny_model_dir: Path) -> Iterator[tuple[Cluster, dict[str, str]]]:
    stubs: dict[str, Stub] = {}
    events: dict[str, str] = {}
    procs: list[Proc] = []
    try:
        for name in ("p0", "d0", "d1"):
            port, events_port = free_port(), free_port()
            role = "prefill" if name.startswith("p") else "decode"
            endpoint = f"tcp://127.0.0.1:{events_port}"
            # --model: /v1/models names the local model directory, where the proxy finds the
            # tokenizer without --tokenizer.
            extra = ["--kv-events", endpoint, "--tokenizer", str(tiny_model_dir),
                     "--model", str(tiny_model_dir)]  # fmt: skip
            proc = start_stub(role, port, tmp_path, extra)
            procs.append(proc)
            stubs[name] = Stub(name, port, proc)
            events[name] = f"{stubs[name].addr}={endpoint},snapshot=tcp://127.0.0.1:{free_port()}"
        for stub in stubs.values():
            wait_http(f"{stub.url}/health", proc=stub.proc)
        yield Cluster(stubs, tmp_path), events
    finally:
        for proc in procs:
            proc.stop()


def _chat(text: str) -> dict[str, Any]:
    return {"model": "stub-model", "max_tokens": 4,
            "messages": [{"role": "user", "content": text}]}  # fmt: skip


def test_second_request_goes_where_the_prefix_is_and_skips_p(
    cache_cluster: tuple[Cluster, dict[str, str]], tiny_model_dir: Path
) -> None:
    cluster, events = cache_cluster
    # The snapshot port given must be the one each stub's publisher binds: port + 1 by default.
    flags = ["--policy", "cache_aware"]
    for name in ("p0", "d0", "d1"):
        addr, _, endpoint = events[name].partition("=")
        flags += ["--kv-events", f"{addr}={endpoint.partition(',')[0]}"]
    proxy = cluster.proxy(("p0",), ("d0", "d1"), flags)
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
