"""Raw-bytes HTTP for the defect tests: a response reader and a fake worker on real sockets.

Nothing here uses an HTTP library, so what the tests see is exactly what went over the wire.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import orjson

_DEADLINE = 10.0


@dataclass
class RawResponse:
    status: int
    headers: dict[bytes, bytes]
    body: bytes
    head: bytes


class RawReader:
    """Reads responses off one socket, keeping what follows a response for the next one."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.closed = False

    def more(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            self.closed = True
            raise EOFError("connection closed")
        self.buf += chunk

    def _need(self, n: int) -> None:
        while len(self.buf) < n:
            self.more()

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self.more()
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def response(self, head_request: bool = False) -> RawResponse:
        """The next response (its body read by Content-Length, chunked or close framing)."""
        while b"\r\n\r\n" not in self.buf:
            self.more()
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ")[1])
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        body = b""
        if head_request or 100 <= status < 200 or status in (204, 304):
            pass
        elif b"content-length" in headers:
            n = int(headers[b"content-length"])
            self._need(n)
            body, self.buf = self.buf[:n], self.buf[n:]
        elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            parts = []
            while True:
                size = int(self._line().split(b";")[0], 16)
                if size == 0:
                    self._line()
                    break
                self._need(size + 2)
                if self.buf[size : size + 2] != b"\r\n":
                    raise ValueError(f"bad chunk framing: {self.buf[: size + 40]!r}")
                parts.append(self.buf[:size])
                self.buf = self.buf[size + 2 :]
            body = b"".join(parts)
        else:
            with contextlib.suppress(EOFError):
                while True:
                    self.more()
            body, self.buf = self.buf, b""
        return RawResponse(status, headers, body, head)


def connect(addr: str, timeout: float = _DEADLINE) -> socket.socket:
    host, _, port = addr.rpartition(":")
    return socket.create_connection((host, int(port)), timeout=timeout)


def post(path: str, body: bytes, extra: bytes = b"") -> bytes:
    return (
        b"POST %s HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n%s"
        b"content-length: %d\r\n\r\n%s" % (path.encode(), extra, len(body), body)
    )


# -- the fake worker ------------------------------------------------------------------------
@dataclass
class Seen:
    """One POST the fake worker received: on which connection, and which request on it."""

    conn: int
    index: int
    body: bytes


def completion_answer(text: str = "fake") -> bytes:
    body = orjson.dumps({
        "id": "cmpl-fake", "object": "text_completion", "model": "stub-model",
        "choices": [{"index": 0, "text": text, "finish_reason": "length", "logprobs": None}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    })  # fmt: skip
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
        len(body),
        body,
    )


Answer = Callable[["FakeWorker", socket.socket, Seen], bool]
"""Writes the answer to one POST; returns False to close the connection."""


def normal(_worker: FakeWorker, sock: socket.socket, _seen: Seen) -> bool:
    sock.sendall(completion_answer())
    return True


@dataclass
class FakeWorker:
    """A worker speaking raw HTTP/1.1 on 127.0.0.1: ``/health`` is 200, POSTs go to ``answer``."""

    answer: Answer = normal
    posts: list[Seen] = field(default_factory=list)
    closed_by_peer: list[int] = field(default_factory=list)
    """Connections the proxy closed (EOF seen while waiting for a request)."""
    conns: dict[int, socket.socket] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.addr = f"127.0.0.1:{self.port}"
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._accept_loop, name="fake-worker", daemon=True)
        self._accept.start()

    def _accept_loop(self) -> None:
        self._listener.settimeout(0.1)
        n = 0
        while not self._stop.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            n += 1
            with self._lock:
                self.conns[n] = sock
            t = threading.Thread(target=self._serve, args=(sock, n), daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, sock: socket.socket, conn: int) -> None:
        sock.settimeout(0.1)
        buf = b""
        index = 0
        try:
            while not self._stop.is_set():
                while b"\r\n\r\n" not in buf:
                    try:
                        chunk = sock.recv(65536)
                    except TimeoutError:
                        if self._stop.is_set():
                            return
                        continue
                    if not chunk:
                        with self._lock:
                            self.closed_by_peer.append(conn)
                        return
                    buf += chunk
                head, _, buf = buf.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                while len(buf) < length:
                    with contextlib.suppress(TimeoutError):
                        chunk = sock.recv(65536)
                        if not chunk:
                            return
                        buf += chunk
                body, buf = buf[:length], buf[length:]
                if head.startswith(b"GET /health"):
                    sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
                    continue
                if head.startswith(b"GET "):
                    sock.sendall(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
                    continue
                index += 1
                seen = Seen(conn, index, body)
                with self._lock:
                    self.posts.append(seen)
                if not self.answer(self, sock, seen):
                    return
        except OSError:
            return
        finally:
            with contextlib.suppress(OSError):
                sock.close()

    def wait(self, predicate: Callable[[], bool], timeout: float = _DEADLINE) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if predicate():
                    return True
            time.sleep(0.02)
        with self._lock:
            return predicate()

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        self._accept.join(5)
        for t in self._threads:
            t.join(5)
