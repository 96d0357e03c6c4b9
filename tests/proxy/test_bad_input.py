"""Bad client input always gets an OpenAI-style 4xx, never a 500."""

from __future__ import annotations

import json

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.proxy.utils import Cluster, ProxyHandle, raw_request


def _assert_openai_error(resp: httpx.Response, status: int) -> None:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["code"] == status
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"]


def test_invalid_bodies_get_4xx(cluster: Cluster) -> None:
    proxy = cluster.proxy(extra=["--max-body", "2000"])
    url = proxy.url + "/v1/completions"
    post = lambda content: httpx.post(url, content=content, timeout=5)  # noqa: E731
    _assert_openai_error(post(b"{not json"), 400)
    _assert_openai_error(post(b""), 400)
    _assert_openai_error(post(b"[1, 2]"), 400)
    _assert_openai_error(post(b'"just a string"'), 400)
    _assert_openai_error(post(json.dumps({"model": "m"}).encode()), 400)  # missing prompt
    _assert_openai_error(post(json.dumps({"prompt": 5}).encode()), 400)
    _assert_openai_error(post(json.dumps({"prompt": [True, "x"]}).encode()), 400)
    for bad in (-1, 0, "12", 1.5, True, 10**12):
        resp = post(json.dumps({"prompt": "hi", "max_tokens": bad}).encode())
        _assert_openai_error(resp, 400)
        assert resp.json()["error"]["param"] == "max_tokens"
    _assert_openai_error(post(json.dumps({"prompt": "hi", "stream": "yes"}).encode()), 400)
    _assert_openai_error(post(json.dumps({"prompt": "hi", "n": 0}).encode()), 400)
    _assert_openai_error(post(json.dumps({"prompt": "x" * 5000}).encode()), 413)
    chat = proxy.url + "/v1/chat/completions"
    for body in ({"model": "m"}, {"messages": []}, {"messages": "hi"}, {"messages": [1]}):
        _assert_openai_error(httpx.post(chat, json=body, timeout=5), 400)
    _assert_openai_error(httpx.get(url, timeout=5), 405)
    _assert_openai_error(httpx.get(proxy.url + "/nope", timeout=5), 404)
    # Nothing reached the workers.
    assert cluster["p0"].requests() == [] and cluster["d0"].requests() == []


def test_malformed_http_and_oversized_headers(cluster: Cluster) -> None:
    proxy = cluster.proxy()
    answer = raw_request(proxy.addr, b"THIS IS NOT HTTP\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400")
    huge = b"GET /health HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 70000 + b"\r\n\r\n"
    assert raw_request(proxy.addr, huge).startswith(b"HTTP/1.1 400")
    # Chunked request bodies are accepted (and bounded like any body).
    chunked = (
        b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
        b'5\r\n{"pro\r\n0\r\n\r\n'
    )
    assert raw_request(proxy.addr, chunked).startswith(b"HTTP/1.1 400")
    assert httpx.get(proxy.url + "/health", timeout=5).status_code == 200


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=12,
)
_fields = st.fixed_dictionaries(
    {},
    optional={
        "prompt": _json, "messages": _json, "max_tokens": _json, "n": _json, "stream": _json,
        "stream_options": _json, "max_completion_tokens": _json, "min_tokens": _json,
        "kv_transfer_params": _json,
    },
)  # fmt: skip


def test_fuzzed_bodies_never_500(cluster: Cluster) -> None:
    proxy = cluster.proxy()

    @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
    @given(body=_fields, chat=st.booleans())
    def check(body: dict[str, object], chat: bool) -> None:
        _post_fuzz(proxy, body, chat)

    check()


def _post_fuzz(proxy: ProxyHandle, body: dict[str, object], chat: bool) -> None:
    path = "/v1/chat/completions" if chat else "/v1/completions"
    resp = httpx.post(proxy.url + path, content=json.dumps(body).encode(), timeout=10)
    assert resp.status_code < 500, (body, resp.status_code, resp.text)


def test_expect_100_continue_is_answered(cluster: Cluster) -> None:
    proxy = cluster.proxy()
    body = json.dumps({"model": "stub-model", "prompt": "word " * 500, "max_tokens": 2}).encode()
    head = (
        b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"expect: 100-continue\r\ncontent-length: %d\r\n\r\n" % len(body)
    )
    import socket

    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(head)
        assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(body)
        answer = b""
        while b'"usage"' not in answer:
            chunk = sock.recv(65536)
            assert chunk
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 OK")


def test_pipelined_requests_answered_in_order(cluster: Cluster) -> None:
    proxy = cluster.proxy()
    one = json.dumps({"model": "stub-model", "prompt": "first", "max_tokens": 1}).encode()
    two = json.dumps({"model": "stub-model", "prompt": "second one", "max_tokens": 2}).encode()
    wire = b"".join(
        b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"x-request-id: pipe-%d\r\ncontent-length: %d\r\n\r\n%s" % (i, len(body), body)
        for i, body in ((1, one), (2, two))
    )
    import socket

    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(wire)
        data = b""
        while data.count(b"HTTP/1.1 200") < 2 or not data.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            assert chunk
            data += chunk
    assert data.index(b"x-request-id: pipe-1") < data.index(b"x-request-id: pipe-2")
