"""A small TCP fault proxy for the KV data channel (reusable by other test areas).

It sits between P and D's TCP data port (D announces the proxy's port via
``KVReceiver(..., advertise_data_port=proxy.port)``), parses the P->D frame stream, and applies
one fault, once, to the ``nth`` chunk frame of a connection: ``drop`` (close both sides halfway
through the payload), ``flip`` (flip one payload bit), ``delay`` (hold the frame ``delay`` seconds),
``duplicate`` (forward the frame twice), or ``none``. D->P bytes pass through untouched.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

from lmcache_disagg.transfer.protocol import (
    FRAME_CHUNK,
    FRAME_HEADER,
    FRAME_HEADER_SIZE,
    FRAME_TRAILER,
)

FAULTS = ("none", "drop", "flip", "delay", "duplicate")


def _read_exact(sock: socket.socket, n: int) -> bytes | None:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(min(1 << 20, n - len(out)))
        if not chunk:
            return None
        out += chunk
    return bytes(out)


class FaultProxy:
    def __init__(self, upstream_port: int, fault: str, nth: int = 1, delay: float = 0.0) -> None:
        assert fault in FAULTS
        self.upstream = ("127.0.0.1", upstream_port)
        self.fault = fault
        self.nth = nth
        self.delay = delay
        self.applied = 0
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.2)
        self.port = self._server.getsockname()[1]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        accept = threading.Thread(target=self._accept, name="faultproxy-accept", daemon=True)
        accept.start()
        self._threads.append(accept)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection(self.upstream)
            with self._lock:
                self._socks += [client, upstream]
            for target, args in (
                (self._forward, (client, upstream)),
                (self._pump, (upstream, client)),
            ):
                thread = threading.Thread(target=target, args=args, daemon=True)
                thread.start()
                self._threads.append(thread)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)

    def _forward(self, src: socket.socket, dst: socket.socket) -> None:
        chunks_seen = 0
        try:
            while True:
                header = _read_exact(src, FRAME_HEADER_SIZE)
                if header is None:
                    break
                kind, nbytes = FRAME_HEADER.unpack(header)[2], FRAME_HEADER.unpack(header)[7]
                if kind != FRAME_CHUNK:
                    dst.sendall(header)
                    continue
                body = _read_exact(src, nbytes + FRAME_TRAILER.size)
                if body is None:
                    break
                chunks_seen += 1
                frame = header + body
                with self._lock:
                    hit = chunks_seen == self.nth and self.fault != "none" and not self.applied
                    if hit:
                        self.applied += 1
                if not hit:
                    dst.sendall(frame)
                    continue
                if self.fault == "drop":
                    dst.sendall(frame[: FRAME_HEADER_SIZE + nbytes // 2])
                    break
                if self.fault == "flip":
                    mutable = bytearray(frame)
                    mutable[FRAME_HEADER_SIZE + nbytes // 2] ^= 0x10
                    dst.sendall(mutable)
                elif self.fault == "delay":
                    time.sleep(self.delay)
                    dst.sendall(frame)
                elif self.fault == "duplicate":
                    dst.sendall(frame)
                    dst.sendall(frame)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._stop.set()
        self._server.close()
        with self._lock:
            socks = list(self._socks)
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in self._threads:
            thread.join(timeout=5)
