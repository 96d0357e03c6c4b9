"""An armable TCP fault proxy for the KV data channel, shared by the transfer and trust tests.

It sits between P and D's TCP data port (D announces the proxy's port, e.g. through
``KVReceiver``'s advertised data port or ``advertised_data_port`` in the connector config), parses
the P->D frame stream with the transfer protocol's header layout, and passes D->P bytes through
untouched. A fault is *armed* at any time from the test thread: :meth:`ArmedFaultProxy.arm` makes
the proxy apply ``fault`` to the ``skip+1``-th chunk frame it forwards from then on, on whichever
connection carries it (a vLLM pair keeps its data connection across many requests, and a fault may
break it).

Faults: ``drop`` (forward half of the payload, then close both sides), ``flip`` (flip one payload
bit), ``delay`` (hold the frame - and so the whole connection - ``delay`` seconds), ``duplicate``
(forward the frame twice).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections import Counter

from lmcache_disagg.transfer.protocol import (
    FRAME_CHUNK,
    FRAME_HEADER,
    FRAME_HEADER_SIZE,
    FRAME_TRAILER,
)

__all__ = ["FAULTS", "ArmedFaultProxy"]

FAULTS = ("drop", "flip", "delay", "duplicate")


def _read_exact(sock: socket.socket, n: int) -> bytes | None:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(min(1 << 20, n - len(out)))
        if not chunk:
            return None
        out += chunk
    return bytes(out)


class ArmedFaultProxy:
    """Listens on ``127.0.0.1:listen_port`` (0 = any) and relays to ``127.0.0.1:upstream_port``."""

    def __init__(self, upstream_port: int, listen_port: int = 0) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self._server = socket.create_server(("127.0.0.1", listen_port))
        self._server.settimeout(0.2)
        self.port: int = self._server.getsockname()[1]
        self.frames_seen = 0
        self.connections = 0
        self.applied: Counter[str] = Counter()
        self._armed: tuple[str, int, float] | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        accept = threading.Thread(target=self._accept, name="armed-fault-accept", daemon=True)
        accept.start()
        self._threads.append(accept)

    # -- test-thread API -------------------------------------------------------------------------

    def arm(self, fault: str, skip: int = 0, delay: float = 0.0) -> None:
        """Apply ``fault`` to the (``skip``+1)-th chunk frame forwarded from now on."""
        assert fault in FAULTS
        with self._lock:
            self._armed = (fault, skip, delay)

    @property
    def armed(self) -> bool:
        with self._lock:
            return self._armed is not None

    def disarm(self) -> None:
        with self._lock:
            self._armed = None

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

    # -- relay threads ---------------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._socks += [client, upstream]
                self.connections += 1
                n = self.connections
            for name, target in (("fwd", self._forward), ("back", self._pump)):
                src, dst = (client, upstream) if name == "fwd" else (upstream, client)
                thread = threading.Thread(
                    target=target, args=(src, dst), name=f"armed-fault-{name}-{n}", daemon=True
                )
                thread.start()
                self._threads.append(thread)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)

    def _take_fault(self) -> tuple[str, float] | None:
        with self._lock:
            self.frames_seen += 1
            if self._armed is None:
                return None
            fault, skip, delay = self._armed
            if skip > 0:
                self._armed = (fault, skip - 1, delay)
                return None
            self._armed = None
            self.applied[fault] += 1
            return fault, delay

    def _forward(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                header = _read_exact(src, FRAME_HEADER_SIZE)
                if header is None:
                    break
                fields = FRAME_HEADER.unpack(header)
                kind, nbytes = fields[2], fields[6]
                if kind != FRAME_CHUNK:
                    dst.sendall(header)
                    continue
                body = _read_exact(src, nbytes + FRAME_TRAILER.size)
                if body is None:
                    break
                frame = header + body
                taken = self._take_fault()
                if taken is None:
                    dst.sendall(frame)
                    continue
                fault, delay = taken
                if fault == "drop":
                    dst.sendall(frame[: FRAME_HEADER_SIZE + nbytes // 2])
                    break
                if fault == "flip":
                    mutable = bytearray(frame)
                    mutable[FRAME_HEADER_SIZE + nbytes // 2] ^= 0x10
                    dst.sendall(mutable)
                elif fault == "delay":
                    time.sleep(delay)
                    dst.sendall(frame)
                else:  # duplicate
                    dst.sendall(frame)
                    dst.sendall(frame)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
