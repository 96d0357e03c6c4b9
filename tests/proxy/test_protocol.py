"""The PD protocol as P and D see it, request ids, push targets, SSE framing and usage."""

from __future__ import annotations

from pathlib import Path

import httpx

from lmcache_disagg import kv_params
from lmcache_disagg.config import DEFAULT_KV_PORT
from tests.proxy.utils import Cluster, chat, completion, sse_events

STOCK_NIXL_FIELDS = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}


def test_prefill_request_shape_and_decode_gets_p_params_verbatim(cluster: Cluster) -> None:
    proxy = cluster.proxy()
    body = chat(
        max_tokens=7, max_completion_tokens=7, stream=True, min_tokens=2, n=2, stop=["x"],
        logprobs=True, stream_options={"include_usage": True}, seed=7,
    )  # fmt: skip
    resp = proxy.post("/v1/chat/completions", body, headers={"X-Request-Id": "rid-proto-1"})
    assert resp.status_code == 200
    (p_req,) = cluster["p0"].requests()
    assert p_req["path"] == "/v1/chat/completions"  # chat is native on both legs
    sent = p_req["body"]
    assert sent["max_tokens"] == 1 and sent["max_completion_tokens"] == 1
    assert sent["stream"] is False and sent["n"] == 1
    assert "stream_options" not in sent and "min_tokens" not in sent and "seed" not in sent
    params = sent[kv_params.KV_TRANSFER_PARAMS]
    for key, value in STOCK_NIXL_FIELDS.items():
        assert params[key] == value
    assert params[kv_params.TRANSFER_ID] == "rid-proto-1-1"
    assert params[kv_params.PUSH_TARGET] == f"127.0.0.1:{DEFAULT_KV_PORT}"
    (d_req,) = cluster["d0"].requests()
    assert d_req["path"] == "/v1/chat/completions"
    d_body = d_req["body"]
    # D gets the original request (n, stop, logprobs, stream_options, min_tokens untouched) ...
    for key in ("max_tokens", "max_completion_tokens", "n", "stop", "logprobs", "stream_options",
                "min_tokens", "stream", "messages", "seed"):  # fmt: skip
        assert d_body[key] == body[key], key
    # ... plus exactly what P returned.
    p_returned = d_body[kv_params.KV_TRANSFER_PARAMS]
    assert p_returned["remote_engine_id"] == cluster["p0"].fingerprint
    assert p_returned[kv_params.TRANSFER_ID] == "rid-proto-1-1"
    assert p_returned[kv_params.NUM_TOKENS] >= 1
    assert d_req["request_id"] == p_req["request_id"] == "rid-proto-1"
    assert resp.headers["x-request-id"] == "rid-proto-1"


def test_request_id_generated_and_shared_by_both_legs(cluster: Cluster) -> None:
    proxy = cluster.proxy()
    resp = proxy.post("/v1/completions", completion())
    assert resp.status_code == 200
    rid = resp.headers["x-request-id"]
    assert rid
    assert cluster["p0"].requests()[0]["request_id"] == rid
    assert cluster["d0"].requests()[0]["request_id"] == rid
    # An unsafe client id (spaces/newline material) is replaced, never forwarded.
    resp = proxy.post("/v1/completions", completion(), headers={"X-Request-Id": "a b"})
    assert resp.headers["x-request-id"] != "a b"


def test_push_target_override_from_cli_and_yaml(cluster: Cluster, tmp_path: Path) -> None:
    proxy = cluster.proxy(decode=[f"{cluster['d0'].addr},kv=127.0.0.9:17999"])
    assert proxy.post("/v1/completions", completion()).status_code == 200
    params = cluster["p0"].requests()[-1]["body"][kv_params.KV_TRANSFER_PARAMS]
    assert params[kv_params.PUSH_TARGET] == "127.0.0.9:17999"

    cfg = tmp_path / "cluster.yaml"
    cfg.write_text(
        "listen_port: 17700\n"
        f"prefill_instances:\n  - http: http://{cluster['p1'].addr}/\n"  # URL form is accepted
        f"decode_instances:\n  - http: {cluster['d1'].addr}\n"
        f"  - http: {cluster['d0'].addr}\n    kv: 127.0.0.8:17001\n"
    )
    proxy = cluster.proxy(prefill=[], decode=[], extra=["--config", str(cfg)])
    for _ in range(2):
        assert proxy.post("/v1/completions", completion()).status_code == 200
    targets = {r["body"][kv_params.KV_TRANSFER_PARAMS][kv_params.PUSH_TARGET]
               for r in cluster["p1"].requests()}  # fmt: skip
    # D1 uses the YAML listen_port as its default KV port; D0 has an explicit endpoint.
    assert targets == {"127.0.0.1:17700", "127.0.0.8:17001"}


def test_stream_content_type_and_non_stream_single_json(cluster: Cluster) -> None:
    proxy = cluster.proxy()
    with httpx.stream("POST", proxy.url + "/v1/completions",
                      json=completion(stream=True), timeout=10) as resp:  # fmt: skip
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        text = resp.read().decode()
    events = sse_events(text)
    assert events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == " tok0 tok1 tok2 tok3"
    resp = proxy.post("/v1/completions", completion())
    assert resp.headers["content-type"].startswith("application/json")
    assert resp.json()["choices"][0]["text"] == " tok0 tok1 tok2 tok3"


def test_usage_non_streaming_counts_pushed_tokens(cluster: Cluster) -> None:
    proxy = cluster.proxy()
    prompt = "one two three four five six seven"
    usage = proxy.post("/v1/completions", completion(prompt)).json()["usage"]
    assert usage["prompt_tokens"] == 7
    assert usage["completion_tokens"] == 4
    assert usage["total_tokens"] == 11
    assert usage["prompt_tokens_details"]["cached_tokens"] == 7  # P pushed all 7 tokens
    # Chat, n=2: completion tokens from D (both samples).
    usage = proxy.post("/v1/chat/completions", chat(n=2)).json()["usage"]
    assert usage["completion_tokens"] == 8
    assert usage["prompt_tokens_details"]["cached_tokens"] == usage["prompt_tokens"]


def test_usage_streaming_include_usage(cluster: Cluster) -> None:
    proxy = cluster.proxy()
    for path, body in (
        ("/v1/completions", completion("a b c d e", stream=True,
                                       stream_options={"include_usage": True})),
        ("/v1/chat/completions", chat("a b c d e", stream=True,
                                      stream_options={"include_usage": True})),
    ):  # fmt: skip
        resp = proxy.post(path, body)
        events = sse_events(resp.text)
        assert events[-1] == "[DONE]"
        usage_events = [e for e in events[:-1] if e.get("usage")]
        assert len(usage_events) == 1
        usage = usage_events[0]["usage"]
        assert usage["completion_tokens"] == 4
        assert usage["prompt_tokens_details"]["cached_tokens"] == usage["prompt_tokens"] > 0
        assert usage["total_tokens"] == usage["prompt_tokens"] + 4


def test_usage_prefers_decode_workers_own_report(cluster: Cluster) -> None:
    cluster["d0"].set(report_cached=True)
    proxy = cluster.proxy()
    # The stub's own report equals the pushed count, so make P's count differ: the stub D
    # reports what it received in lmcache_num_tokens; we check the value is D's, untouched.
    usage = proxy.post("/v1/completions", completion("x y z")).json()["usage"]
    assert usage["prompt_tokens_details"] == {"cached_tokens": 3}
    # Local prefill (no P): D reports 0 cached, and the proxy keeps that.
    proxy = cluster.proxy(prefill=[], extra=["--local-prefill-threshold", "100000"],
                          wait_ready=False)  # fmt: skip
    from tests.proxy.utils import wait_for

    assert wait_for(lambda: httpx.get(proxy.url + "/v1/models", timeout=2).status_code == 200)
    usage = proxy.post("/v1/completions", completion("x y z")).json()["usage"]
    assert usage["prompt_tokens_details"] == {"cached_tokens": 0}
