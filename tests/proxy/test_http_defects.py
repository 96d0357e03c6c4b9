"""The HTTP defects of the hand-written server and client (issue 14), each driven with raw bytes.

Server side (1-7): raw bytes over a real socket to the running proxy. Upstream (8-13): the proxy
against a fake worker that writes raw bytes (rawhttp.FakeWorker). Each docstring says what the
old layer (proxy/httpserver.py and the httptools upstream client) did.
"""

from __future__ import annotations

import json
import select
import socket
import time
from collections.abc import Iterator

import pytest

from tests.proxy.rawhttp import (
    FakeWorker,
    RawReader,
    Seen,
    completion_answer,
    connect,
    normal,
    post,
)
from tests.proxy.utils import Cluster, ProxyHandle, completion, sse_events

QUIET = ["--health-interval", "60"]  # no health GETs interleaved with the upstream tests' POSTs


def _body(**extra: object) -> bytes:
    return json.dumps(completion(**extra)).encode()


@pytest.fixture
def fake() -> Iterator[FakeWorker]:
    worker = FakeWorker()
    yield worker
    worker.close()


def _fake_proxy(cluster: Cluster, fake: FakeWorker, *extra: str) -> ProxyHandle:
    return cluster.proxy(decode=[fake.addr], extra=[*QUIET, *extra])


def _ask(proxy: ProxyHandle, body: bytes | None = None, stream: bool = False) -> RawReader:
    sock = connect(proxy.addr)
    sock.sendall(post("/v1/completions", body or _body(stream=stream)))
    return RawReader(sock)


# -- server side ------------------------------------------------------------------------------
def test_1_head_has_no_body_and_routes_answer_only_their_methods(cluster: Cluster) -> None:
    """Old: a HEAD answer carried a body (the next answer on the connection was misread), and
    ``DELETE /health`` answered 200."""
    proxy = cluster.proxy()
    with connect(proxy.addr) as sock:
        sock.sendall(
            b"HEAD /health HTTP/1.1\r\nhost: x\r\n\r\n"
            b"HEAD /v1/completions HTTP/1.1\r\nhost: x\r\n\r\n"
            b"DELETE /health HTTP/1.1\r\nhost: x\r\n\r\n"
            b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n"
        )
        reader = RawReader(sock)
        head = reader.response(head_request=True)
        assert head.status == 200 and int(head.headers[b"content-length"]) > 0
        assert reader.buf == b"" or reader.buf.startswith(b"HTTP/1.1 ")
        head_post = reader.response(head_request=True)
        assert head_post.status == 405 and b"POST" in head_post.headers[b"allow"]
        assert reader.buf == b"" or reader.buf.startswith(b"HTTP/1.1 ")
        delete = reader.response()
        assert delete.status == 405 and json.loads(delete.body)["error"]["code"] == 405
        get = reader.response()
        assert get.status == 200 and json.loads(get.body) == {"status": "ok"}


def _slow_stream(cluster: Cluster) -> ProxyHandle:
    cluster["d0"].set("slow", slow_delay=0.05)
    return cluster.proxy(extra=["--max-body", "2000"])


def test_2_100_continue_is_not_written_into_a_streaming_answer(cluster: Cluster) -> None:
    """Old: ``100 Continue`` went out the moment the headers arrived, so on a pipelined
    connection it landed inside the chunked body of the answer still streaming."""
    proxy = _slow_stream(cluster)
    second = _body(prompt="second")
    with connect(proxy.addr) as sock:
        sock.sendall(
            post("/v1/completions", _body(stream=True, max_tokens=8))
            + b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"expect: 100-continue\r\ncontent-length: %d\r\n\r\n" % len(second)
        )
        reader = RawReader(sock)
        first = reader.response()
        assert first.status == 200 and b"100 Continue" not in first.body
        assert sse_events(first.body.decode())[-1] == "[DONE]"
        assert reader.response().status == 100
        sock.sendall(second)
        answer = reader.response()
        assert answer.status == 200 and json.loads(answer.body)["choices"]


def test_3_over_limit_pipelined_body_waits_for_the_stream_ahead(cluster: Cluster) -> None:
    """Old: a body over the limit pipelined behind a streaming request had its 413 written into
    that stream, cutting it off."""
    proxy = _slow_stream(cluster)
    big = json.dumps(completion(prompt="x " * 3000)).encode()
    with connect(proxy.addr) as sock:
        sock.sendall(post("/v1/completions", _body(stream=True, max_tokens=8)))
        time.sleep(0.1)  # the stream has started
        sock.sendall(post("/v1/completions", big))
        reader = RawReader(sock)
        first = reader.response()
        assert first.status == 200
        events = sse_events(first.body.decode())
        assert events[-1] == "[DONE]" and len(events) == 9
        refused = reader.response()
        assert refused.status == 413 and json.loads(refused.body)["error"]["code"] == 413


def test_4_request_after_connection_close_does_not_spoil_the_first(cluster: Cluster) -> None:
    """Old: bytes after a ``Connection: close`` request made the server answer only 400, and the
    first request never ran (uvicorn sets the parser's ``lenient_data_after_close``)."""
    proxy = cluster.proxy()
    with connect(proxy.addr) as sock:
        sock.sendall(
            post("/v1/completions", _body(), extra=b"connection: close\r\n")
            + b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n"
        )
        reader = RawReader(sock)
        answer = reader.response()
        assert answer.status == 200 and json.loads(answer.body)["choices"]
        with pytest.raises(EOFError):
            reader.response()
        assert b"HTTP/1.1" not in reader.buf
    assert len(cluster["d0"].requests()) == 1


def _assert_public(body: bytes, rid: str, cluster: Cluster) -> None:
    text = body.decode()
    for stub in ("p0", "p1", "d0", "d1"):
        assert str(cluster[stub].port) not in text, text
    for leak in ("127.0.0.1", "Error(", "errno", "Traceback"):
        assert leak not in text, text
    error = json.loads(text.removeprefix("data: ").strip())["error"]
    assert error["request_id"] == rid and error["message"]


def test_5_error_bodies_name_the_failure_not_addresses_or_reprs(cluster: Cluster) -> None:
    """Old: error bodies showed clients the worker's host:port and exception reprs such as
    ``ConnectionResetError(104, ...)``."""
    proxy = cluster.proxy(extra=["--no-local-fallback", "--prefill-timeout", "0.5"])
    cluster["p0"].set("reset")
    reader = _ask_with_id(proxy, "rid-five-a", _body())
    answer = reader.response()
    assert answer.status == 502
    _assert_public(answer.body, "rid-five-a", cluster)
    cluster["p0"].set("none")
    cluster["d0"].set("reset")
    answer = _ask_with_id(proxy, "rid-five-b", _body()).response()
    assert answer.status == 502
    _assert_public(answer.body, "rid-five-b", cluster)
    cluster["d0"].set("die")
    answer = _ask_with_id(proxy, "rid-five-c", _body(stream=True, max_tokens=8)).response()
    assert answer.status == 200
    last = answer.body.strip().split(b"\n\n")[-1]
    _assert_public(last, "rid-five-c", cluster)


def _ask_with_id(proxy: ProxyHandle, rid: str, body: bytes) -> RawReader:
    sock = connect(proxy.addr)
    sock.sendall(post("/v1/completions", body, extra=b"x-request-id: %s\r\n" % rid.encode()))
    return RawReader(sock)


def test_6_endless_header_line_is_refused_while_it_arrives(cluster: Cluster) -> None:
    """Old: the header limit was checked only once a header was complete, so one endless header
    value kept growing the process (96 MB in the probe) and was never answered."""
    proxy = cluster.proxy()
    with connect(proxy.addr) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\nx-endless: ")
        answer = b""
        sent = 0
        while sent < 8 * 1024 * 1024 and not answer:
            try:
                sock.sendall(b"a" * 16384)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += 16384
            readable, _, _ = select.select([sock], [], [], 0.01)
            if readable:
                answer = sock.recv(65536)
        if not answer:
            answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 400")
    assert sent < 1024 * 1024  # refused near the 64 KiB limit, not after the whole line


def test_7_a_client_that_does_not_read_a_whole_answer_is_dropped(cluster: Cluster) -> None:
    """Old: answers that were not streamed ignored write back-pressure: the whole body was
    queued in the proxy's memory however slowly (or not at all) the client read."""
    proxy = cluster.proxy(extra=["--write-timeout", "1"])
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", proxy.port))
    with sock:
        sock.sendall(post("/v1/completions", _body(max_tokens=900_000)))
        reader = RawReader(sock)
        while b"\r\n\r\n" not in reader.buf:
            reader.more()
        length = int(reader.buf.split(b"content-length: ")[1].split(b"\r\n")[0])
        assert length > 8 * 1024 * 1024
        time.sleep(3)  # not reading, well past the write timeout
        received = len(reader.buf)
        try:
            while True:
                chunk = sock.recv(1 << 20)
                if not chunk:
                    break
                received += len(chunk)
        except ConnectionResetError:
            pass
    assert received < length  # dropped, not fed the whole answer
    assert proxy.metric("lmcache_proxy_requests_total", status="499") == 1


# -- upstream ---------------------------------------------------------------------------------
def test_8_upstream_101_is_not_relayed(cluster: Cluster, fake: FakeWorker) -> None:
    """Old: an upstream ``101 Switching Protocols`` was relayed to the client, and its parser
    exception went unhandled."""

    def switch(_w: FakeWorker, sock: socket.socket, _seen: Seen) -> bool:
        sock.sendall(
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: h2c\r\nconnection: upgrade\r\n\r\n"
        )
        return False

    fake.answer = switch
    proxy = _fake_proxy(cluster, fake)
    answer = _ask(proxy).response()
    assert answer.status == 502 and json.loads(answer.body)["error"]["code"] == 502
    fake.answer = normal
    proxy = _fake_proxy(cluster, fake)
    assert _ask(proxy).response().status == 200


def test_9_a_second_response_in_the_same_write_is_not_relayed(
    cluster: Cluster, fake: FakeWorker
) -> None:
    """Old: a second response sent by a worker in the same write was appended to the client's
    answer (``{"id":"cmpl-fake",...}{"id":"SMUGGLED-RESPONSE",...}``)."""

    def smuggle(_w: FakeWorker, sock: socket.socket, seen: Seen) -> bool:
        extra = completion_answer("SMUGGLED-RESPONSE") if seen.index == 1 else b""
        sock.sendall(completion_answer() + extra)
        return True

    fake.answer = smuggle
    proxy = _fake_proxy(cluster, fake)
    for _ in range(3):
        answer = _ask(proxy).response()
        assert answer.status == 200 and b"SMUGGLED" not in answer.body
        assert json.loads(answer.body)["choices"][0]["text"] == "fake"


def test_10_close_delimited_body_and_upstream_header_limit(
    cluster: Cluster, fake: FakeWorker
) -> None:
    """Old: a close-delimited body (no length, no chunking) failed as "body broken", and a
    worker's headers had no size limit."""

    def close_delimited(_w: FakeWorker, sock: socket.socket, _seen: Seen) -> bool:
        body = completion_answer().partition(b"\r\n\r\n")[2]
        sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n" + body)
        return False

    fake.answer = close_delimited
    proxy = _fake_proxy(cluster, fake)
    answer = _ask(proxy).response()
    assert answer.status == 200 and json.loads(answer.body)["choices"][0]["text"] == "fake"

    def endless(_w: FakeWorker, sock: socket.socket, _seen: Seen) -> bool:
        sock.sendall(b"HTTP/1.1 200 OK\r\nx-endless: ")
        for _ in range(64):
            sock.sendall(b"a" * 65536)
        return False

    fake.answer = endless
    answer = _ask(proxy).response()
    assert answer.status == 502 and json.loads(answer.body)["error"]["code"] == 502


def test_11_idle_connection_that_got_bytes_or_eof_is_not_reused(
    cluster: Cluster, fake: FakeWorker
) -> None:
    """Old: a pooled connection that received bytes or EOF while idle was handed out again."""

    def stray_then_normal(_w: FakeWorker, sock: socket.socket, seen: Seen) -> bool:
        sock.sendall(completion_answer())
        if seen.conn == 1 and seen.index == 1:
            time.sleep(0.2)  # now idle in the proxy's pool
            sock.sendall(completion_answer("STALE-BYTES"))
        return True

    fake.answer = stray_then_normal
    proxy = _fake_proxy(cluster, fake)
    first = _ask(proxy).response()
    assert first.status == 200
    time.sleep(0.5)
    second = _ask(proxy).response()
    assert second.status == 200 and b"STALE" not in second.body
    assert fake.posts[-1].conn != fake.posts[0].conn

    def eof_after(_w: FakeWorker, sock: socket.socket, _seen: Seen) -> bool:
        sock.sendall(completion_answer())
        sock.shutdown(socket.SHUT_WR)  # EOF while the connection idles in the pool
        return True

    fake.answer = eof_after
    before = len(fake.posts)
    assert _ask(proxy).response().status == 200
    time.sleep(0.3)
    assert _ask(proxy).response().status == 200
    assert fake.posts[-1].conn != fake.posts[before].conn


def test_12_idle_upstream_connections_are_not_used_past_the_idle_timeout(
    cluster: Cluster, fake: FakeWorker
) -> None:
    """Old: idle connections were kept (and reused) for 30 s, while vLLM closes them after 5 s,
    so a request could be written into a connection the worker was closing."""
    from lmcache_disagg.proxy.upstream import IDLE_TIMEOUT  # (old code: no such setting)

    assert IDLE_TIMEOUT < 5.0
    proxy = _fake_proxy(cluster, fake)
    assert _ask(proxy).response().status == 200
    assert _ask(proxy).response().status == 200
    assert fake.posts[0].conn == fake.posts[1].conn  # kept alive while in use
    time.sleep(IDLE_TIMEOUT + 0.5)
    assert _ask(proxy).response().status == 200
    assert fake.posts[2].conn != fake.posts[1].conn


def test_13_no_post_retry_after_failure_on_a_reused_connection(
    cluster: Cluster, fake: FakeWorker
) -> None:
    """Old: after a failure on a reused connection the POST was sent again on a new one, though
    the worker may already have received (and run) it."""

    def drop_second(_w: FakeWorker, sock: socket.socket, seen: Seen) -> bool:
        if seen.index == 1:
            sock.sendall(completion_answer())
            return True
        return False  # got the whole request, then closes without answering

    fake.answer = drop_second
    proxy = _fake_proxy(cluster, fake)
    assert _ask(proxy).response().status == 200
    answer = _ask(proxy).response()
    assert answer.status == 502
    time.sleep(0.3)
    assert [(s.conn, s.index) for s in fake.posts] == [
        (fake.posts[0].conn, 1),
        (fake.posts[0].conn, 2),
    ]


# -- what the old server did better, kept ---------------------------------------------------
def test_kept_body_and_header_deadlines(cluster: Cluster) -> None:
    """A body or headers that do not arrive in time get 408 and the connection is closed."""
    proxy = cluster.proxy(extra=["--body-timeout", "0.5", "--header-timeout", "0.5"])
    with connect(proxy.addr) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b'content-length: 100\r\n\r\n{"prompt":'
        )
        reader = RawReader(sock)
        answer = reader.response()
        assert answer.status == 408 and json.loads(answer.body)["error"]["code"] == 408
        with pytest.raises(EOFError):
            reader.response()
    with connect(proxy.addr) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\nx-slow: 1\r\n")  # headers never end
        reader = RawReader(sock)
        answer = reader.response()
        assert answer.status == 408
        with pytest.raises(EOFError):
            reader.response()
    assert cluster["d0"].requests() == []


def test_kept_body_limit_refused_before_the_body_is_read(cluster: Cluster) -> None:
    """A declared Content-Length over --max-body is answered 413 at once; so is a chunked body
    as soon as it passes the limit."""
    proxy = cluster.proxy(extra=["--max-body", "2000"])
    with connect(proxy.addr) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 50000000\r\n\r\n"
        )
        answer = RawReader(sock).response()  # answered without the 50 MB being sent
        assert answer.status == 413
    with connect(proxy.addr) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        sock.sendall(b"%x\r\n%s\r\n" % (3000, b"x" * 3000))  # over the limit, never finished
        answer = RawReader(sock).response()
        assert answer.status == 413
