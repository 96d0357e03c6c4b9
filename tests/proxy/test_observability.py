"""Metrics, the per-request log line, /v1/models aggregation, and dropped internal fields."""

from __future__ import annotations

import json

import httpx

from lmcache_disagg import kv_params
from tests.proxy.utils import Cluster, completion, sse_events


def test_metrics_cover_routes_latency_workers_and_fallbacks(cluster: Cluster) -> None:
    proxy = cluster.proxy(prefill=["p0", "p1"], extra=["--prefill-timeout", "0.5"])
    for _ in range(3):
        assert proxy.post("/v1/completions", completion()).status_code == 200
    assert proxy.post("/v1/completions", b"{bad").status_code == 400
    cluster["p0"].set("500")
    cluster["p1"].set("500")
    assert proxy.post("/v1/completions", completion()).status_code == 200  # local fallback
    text = proxy.metrics()
    assert proxy.metric("lmcache_proxy_requests_total", route="completions", status="200") == 4
    assert proxy.metric("lmcache_proxy_requests_total", route="completions", status="400") == 1
    assert proxy.metric("lmcache_proxy_prefill_seconds_count") == 3
    assert proxy.metric("lmcache_proxy_decode_ttft_seconds_count") == 4
    assert proxy.metric("lmcache_proxy_e2e_seconds_count") == 5
    assert proxy.metric("lmcache_proxy_retries_total", leg="prefill") == 1
    assert proxy.metric("lmcache_proxy_fallbacks_total", reason="prefill_failed") == 1
    assert (
        f'lmcache_proxy_worker_inflight{{role="decode",worker="{cluster["d0"].addr}"}} 0.0' in text
    )
    assert "lmcache_proxy_breaker_state{" in text
    assert "lmcache_proxy_worker_healthy{" in text


def test_one_structured_log_line_per_request(cluster: Cluster) -> None:
    proxy = cluster.proxy()
    for i in range(3):
        proxy.post("/v1/completions", completion(), headers={"X-Request-Id": f"logline-{i}"})
    proxy.proc.stop()
    records = [
        json.loads(line.split("lmcache_disagg.proxy.access ", 1)[1])
        for line in proxy.log_text().splitlines()
        if "lmcache_disagg.proxy.access " in line
    ]
    mine = [r for r in records if r["request_id"].startswith("logline-")]
    assert [r["request_id"] for r in mine] == ["logline-0", "logline-1", "logline-2"]
    for record in mine:
        assert record["prefill"] == cluster["p0"].addr
        assert record["decode"] == cluster["d0"].addr
        assert record["status"] == 200
        assert record["total_ms"] > 0 and record["prefill_ms"] > 0 and record["ttft_ms"] >= 0


def test_models_aggregated_across_workers(cluster: Cluster) -> None:
    cluster["d1"].set(model="other-model")
    proxy = cluster.proxy(prefill=["p0", "p1"], decode=["d0", "d1"])
    ids = sorted(m["id"] for m in httpx.get(proxy.url + "/v1/models", timeout=5).json()["data"])
    assert ids == ["other-model", "stub-model"]


def test_client_kv_transfer_params_dropped_and_counted(cluster: Cluster) -> None:
    proxy = cluster.proxy()
    evil = {"do_remote_decode": True, kv_params.PUSH_TARGET: "10.6.6.6:1234",
            "remote_host": "10.6.6.6", "remote_port": 1234}  # fmt: skip
    for stream in (False, True):
        resp = proxy.post("/v1/completions", completion(stream=stream, kv_transfer_params=evil))
        assert resp.status_code == 200
        if stream:
            assert sse_events(resp.text)[-1] == "[DONE]"
    for req in cluster["p0"].requests():
        params = req["body"][kv_params.KV_TRANSFER_PARAMS]
        assert params[kv_params.PUSH_TARGET] != "10.6.6.6:1234"
        assert params["remote_host"] is None
    for req in cluster["d0"].requests():
        assert req["body"][kv_params.KV_TRANSFER_PARAMS]["remote_host"] == "127.0.0.1"
    # Even with P unusable (local prefill on D), the client's params never reach D.
    cluster["p0"].set("500")
    assert proxy.post("/v1/completions", completion(kv_transfer_params=evil)).status_code == 200
    assert kv_params.KV_TRANSFER_PARAMS not in cluster["d0"].requests()[-1]["body"]
    assert proxy.metric("lmcache_proxy_client_internal_fields_dropped_total",
                        field="kv_transfer_params") == 3  # fmt: skip
    proxy.proc.stop()
    assert proxy.log_text().count("dropped client-supplied internal field") == 3


def test_access_log_off_switches(cluster: Cluster) -> None:
    for flags in (["--no-access-log"], ["--log-level", "warning"]):
        proxy = cluster.proxy(extra=flags)
        assert proxy.post("/v1/completions", completion()).status_code == 200
        proxy.proc.stop()
        assert "lmcache_disagg.proxy.access" not in proxy.log_text()
