"""Retries, fallbacks, timeouts, error mapping, disconnects, admission and readiness."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import httpx

from lmcache_disagg import kv_params
from lmcache_disagg.bench.cluster import free_port
from tests.proxy.utils import Cluster, completion, sse_events, wait_for

SHORT = ["--prefill-timeout", "0.5", "--first-byte-timeout", "0.5", "--idle-timeout", "0.5",
         "--decode-timeout", "1", "--connect-timeout", "0.5"]  # fmt: skip


def test_prefill_failure_retried_on_other_p(cluster: Cluster) -> None:
    proxy = cluster.proxy(prefill=["p0", "p1"], extra=SHORT)
    for fault in ("500", "reset", "hang"):
        cluster["p0"].set(fault)
        for _ in range(4):
            resp = proxy.post("/v1/completions", completion())
            assert resp.status_code == 200, resp.text
            # D got a real push from the healthy P.
            params = cluster["d0"].requests()[-1]["body"][kv_params.KV_TRANSFER_PARAMS]
            assert params["remote_engine_id"] == cluster["p1"].fingerprint
    assert proxy.metric("lmcache_proxy_retries_total", leg="prefill") >= 1


def test_no_usable_p_falls_back_to_local_prefill_on_d(cluster: Cluster) -> None:
    cluster["p0"].set("500")
    proxy = cluster.proxy(extra=SHORT)
    resp = proxy.post("/v1/completions", completion())
    assert resp.status_code == 200
    assert kv_params.KV_TRANSFER_PARAMS not in cluster["d0"].requests()[-1]["body"]
    assert proxy.metric("lmcache_proxy_fallbacks_total", reason="prefill_failed") == 1
    # Configurable off: the client then gets the mapped error.
    off = cluster.proxy(extra=[*SHORT, "--no-local-fallback"])
    assert off.post("/v1/completions", completion()).status_code == 502
    cluster["p0"].set("hang")
    assert off.post("/v1/completions", completion()).status_code == 504
    cluster["p0"].set("reset")
    assert off.post("/v1/completions", completion()).status_code == 502


def test_error_mapping_502_503_504(cluster: Cluster) -> None:
    dead = f"127.0.0.1:{free_port()}"
    proxy = cluster.proxy(decode=[dead], extra=SHORT, wait_ready=False)
    resp = proxy.post("/v1/completions", completion())
    assert resp.status_code == 503  # no healthy D
    assert resp.json()["error"]["code"] == 503
    assert resp.headers["retry-after"] == "1"
    ready = httpx.get(proxy.url + "/ready", timeout=2)
    assert ready.status_code == 503
    assert ready.json() == {"ready": False, "prefill_healthy": 1, "decode_healthy": 0}
    proxy = cluster.proxy(decode=["d0", "d1"], extra=SHORT)
    cluster["d0"].set("500")
    cluster["d1"].set("500")
    assert proxy.post("/v1/completions", completion()).status_code == 502
    cluster["d0"].set("hang")
    cluster["d1"].set("hang")
    resp = proxy.post("/v1/completions", completion(stream=True))
    assert resp.status_code == 504
    assert resp.json()["error"]["type"] == "timeout"


def test_upstream_4xx_passes_through(cluster: Cluster) -> None:
    proxy = cluster.proxy(decode=["d0", "d1"], extra=SHORT)
    cluster["d0"].set("400")
    cluster["d1"].set("400")
    resp = proxy.post("/v1/completions", completion())
    assert resp.status_code == 400
    assert resp.json()["error"]["message"] == "injected bad request"
    # A 4xx from P is the client's fault too: passed through, not retried elsewhere.
    cluster["d0"].set("none")
    cluster["d1"].set("none")
    cluster["p0"].set("400")
    resp = proxy.post("/v1/completions", completion())
    assert resp.status_code == 400
    assert resp.json()["error"]["type"] == "BadRequestError"


def test_decode_failure_before_first_byte_retried_on_other_d(cluster: Cluster) -> None:
    proxy = cluster.proxy(decode=["d0", "d1"], extra=SHORT)
    for fault in ("500", "reset", "hang"):
        cluster["d0"].set(fault)
        for stream in (False, True):
            for _ in range(2):
                resp = proxy.post("/v1/completions", completion(stream=stream))
                assert resp.status_code == 200, (fault, resp.text)
                if stream:
                    assert sse_events(resp.text)[-1] == "[DONE]"
    # The retried D prefilled locally: it got no params pointing at the other D's KV.
    assert any(kv_params.KV_TRANSFER_PARAMS not in r["body"] for r in cluster["d1"].requests())
    assert proxy.metric("lmcache_proxy_retries_total", leg="decode") >= 1


def test_decode_retry_with_fresh_push(cluster: Cluster) -> None:
    proxy = cluster.proxy(decode=["d0", "d1"], extra=[*SHORT, "--decode-retry-repush"])
    cluster["d0"].set("500")
    for _ in range(2):
        assert proxy.post("/v1/completions", completion()).status_code == 200
    pushes = [r["body"][kv_params.KV_TRANSFER_PARAMS][kv_params.PUSH_TARGET]
              for r in cluster["p0"].requests()]  # fmt: skip
    assert len(set(pushes)) == 1  # both D share the default KV port on 127.0.0.1
    with_params = [r for r in cluster["d1"].requests() if kv_params.KV_TRANSFER_PARAMS in r["body"]]
    assert len(with_params) == 2
    # Each attempt has its own transfer id.
    ids = [r["body"][kv_params.KV_TRANSFER_PARAMS][kv_params.TRANSFER_ID]
           for r in cluster["p0"].requests()]  # fmt: skip
    assert len(ids) == len(set(ids))


def test_mid_stream_failure_becomes_sse_error_event(cluster: Cluster) -> None:
    proxy = cluster.proxy(extra=SHORT)
    cluster["d0"].set("die")
    resp = proxy.post("/v1/completions", completion(stream=True, max_tokens=8))
    assert resp.status_code == 200
    events = sse_events(resp.text)
    assert "[DONE]" not in events
    assert events[-1]["error"]["code"] == 502
    assert events[0]["choices"][0]["text"] == " tok0"
    # Idle timeout mid-stream (slow D) is reported the same way, as 504.
    proxy = cluster.proxy(extra=["--first-byte-timeout", "5", "--idle-timeout", "0.5"])
    cluster["d0"].set("slow", slow_delay=0.8)
    resp = proxy.post("/v1/completions", completion(stream=True, max_tokens=3))
    events = sse_events(resp.text)
    assert events[-1]["error"]["code"] == 504


def _open_stream_and_drop(addr: str, body: bytes, after_bytes: int) -> float:
    host, _, port = addr.rpartition(":")
    sock = socket.create_connection((host, int(port)), timeout=5)
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(body), body)
    )
    received = b""
    while len(received) < after_bytes:
        chunk = sock.recv(65536)
        if not chunk:
            break
        received += chunk
    sock.close()
    return time.monotonic()


def test_client_disconnect_cancels_decode_within_1s(cluster: Cluster) -> None:
    proxy = cluster.proxy()
    cluster["d0"].set("slow", slow_delay=0.2)
    import json

    body = json.dumps(completion(stream=True, max_tokens=200)).encode()
    closed_at = _open_stream_and_drop(proxy.addr, body, after_bytes=300)
    assert wait_for(lambda: cluster["d0"].log()["counts"]["cancelled"] == 1, timeout=3)
    event = cluster["d0"].log()["events"][-1]
    assert event["event"] == "cancelled"
    assert event["time"] - (time.time() - (time.monotonic() - closed_at)) < 1.0
    assert cluster["d0"].log()["inflight"] == 0


def test_client_disconnect_during_prefill_cancels_p(cluster: Cluster) -> None:
    proxy = cluster.proxy()
    cluster["p0"].set("hang")
    import json

    body = json.dumps(completion()).encode()
    host, _, port = proxy.addr.rpartition(":")
    sock = socket.create_connection((host, int(port)), timeout=5)
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(body), body)
    )
    assert wait_for(lambda: cluster["p0"].log()["inflight"] == 1, timeout=3)
    sock.close()
    closed = time.time()
    assert wait_for(lambda: cluster["p0"].log()["counts"]["cancelled"] == 1, timeout=3)
    assert cluster["p0"].log()["events"][-1]["time"] - closed < 1.0
    # D never saw the request.
    assert cluster["d0"].requests() == []


def test_429_with_retry_after_when_full(cluster: Cluster) -> None:
    proxy = cluster.proxy(extra=["--max-concurrency", "1"])
    cluster["d0"].set("slow", slow_delay=0.1)
    results: list[httpx.Response] = []
    thread = threading.Thread(
        target=lambda: results.append(proxy.post("/v1/completions", completion(max_tokens=10)))
    )
    thread.start()
    assert wait_for(lambda: cluster["d0"].log()["inflight"] == 1, timeout=3)
    resp = proxy.post("/v1/completions", completion())
    assert resp.status_code == 429
    assert resp.headers["retry-after"] == "1"
    assert resp.json()["error"]["type"] == "rate_limit_error"
    thread.join(10)
    assert results[0].status_code == 200
    assert proxy.post("/v1/completions", completion()).status_code == 200


def test_ready_only_when_a_p_and_a_d_are_healthy(cluster: Cluster) -> None:
    cluster["p0"].set("unhealthy")
    proxy = cluster.proxy(wait_ready=False)
    assert httpx.get(proxy.url + "/health", timeout=2).status_code == 200
    time.sleep(0.5)
    assert httpx.get(proxy.url + "/ready", timeout=2).status_code == 503
    cluster["p0"].set("none")
    assert wait_for(lambda: httpx.get(proxy.url + "/ready", timeout=2).status_code == 200, 5)
    cluster["d0"].set("unhealthy")
    assert wait_for(lambda: httpx.get(proxy.url + "/ready", timeout=2).status_code == 503, 5)
    # A proxy whose workers are not listening at all is never ready.
    ghost = cluster.proxy(prefill=[f"127.0.0.1:{free_port()}"], decode=[f"127.0.0.1:{free_port()}"],
                          wait_ready=False)  # fmt: skip
    time.sleep(0.5)
    assert httpx.get(ghost.url + "/ready", timeout=2).status_code == 503


def test_breaker_opens_and_skips_faulty_prefill_worker(cluster: Cluster) -> None:
    proxy = cluster.proxy(prefill=["p0", "p1"],
                          extra=[*SHORT, "--breaker-threshold", "2", "--breaker-cooldown", "30"])  # fmt: skip
    cluster["p0"].set("500")
    for _ in range(12):
        assert proxy.post("/v1/completions", completion()).status_code == 200
    # Two failures open the breaker; afterwards every request goes straight to p1.
    assert cluster["p0"].log()["counts"]["requests"] == 2
    assert proxy.metric("lmcache_proxy_breaker_state", role="prefill",
                        worker=cluster["p0"].addr) == 1  # fmt: skip


def test_sigterm_lets_streams_in_flight_finish_and_refuses_new_connections(
    cluster: Cluster,
) -> None:
    """A rolling restart: SIGTERM stops the listener at once, but a stream already being served
    runs to its [DONE] (within --shutdown-grace) before the process exits."""
    proxy = cluster.proxy(extra=["--shutdown-grace", "20"])
    cluster["d0"].set("slow", slow_delay=0.1)  # ~0.1 s per streamed token
    body = completion(max_tokens=12, stream=True)
    started = threading.Event()
    result: dict[str, object] = {}

    def stream() -> None:
        chunks = []
        with httpx.stream("POST", proxy.url + "/v1/completions", json=body, timeout=30) as resp:
            result["status"] = resp.status_code
            for chunk in resp.iter_text():
                chunks.append(chunk)
                started.set()
        result["text"] = "".join(chunks)

    client = threading.Thread(target=stream)
    client.start()
    assert started.wait(10)
    os.kill(proxy.proc.pid, signal.SIGTERM)

    def refused() -> bool:
        try:
            socket.create_connection(("127.0.0.1", proxy.port), timeout=0.5).close()
        except OSError:
            return True
        return False

    assert wait_for(refused, timeout=5)
    assert proxy.proc.alive()  # still serving the stream in flight
    client.join(30)
    assert result["status"] == 200
    events = sse_events(str(result["text"]))
    assert events[-1] == "[DONE]"
    tokens = [e for e in events if isinstance(e, dict) and e.get("choices")]
    assert len(tokens) == 12
    assert not any(isinstance(e, dict) and "error" in e for e in events)
    proxy.proc.popen.wait(10)
