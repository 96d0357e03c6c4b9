"""P's control-plane I/O thread: the only thread that touches the sender's zmq sockets.

zmq sockets are not thread-safe, and a request that holds a socket while it waits for its reply
would stall every other user of that peer (e.g. a data thread that wants to send a finish notice
while the producer waits for a reservation). So one ``lmcd-tx-ctl`` thread owns every DEALER
socket: callers hand it ``(peer, payload, rid, callback)`` commands through a bounded queue and a
wake-up socketpair; replies are dispatched to the callbacks on that thread (callbacks must be
short and must not block). It also runs periodic housekeeping (push deadlines) every
:data:`HOUSEKEEPING_INTERVAL` seconds.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import msgspec
import zmq

from lmcache_disagg.transfer.errors import DeadlineExceeded, PeerClosed
from lmcache_disagg.transfer.protocol import Reply, decode_reply
from lmcache_disagg.transfer.wakeup import Wakeup

__all__ = ["HOUSEKEEPING_INTERVAL", "ControlLoop"]

logger = logging.getLogger(__name__)

HOUSEKEEPING_INTERVAL = 0.05
_MAX_COMMANDS = 4096
_LINGER_MS = 200

Callback = Callable[[Reply | None], None]
"""Called with the reply, or None when the socket closed before a reply came."""


class ControlLoop:
    """Owns the zmq context's DEALER sockets, one per peer key (an opaque hashable)."""

    def __init__(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        on_tick: Callable[[], None],
        on_unmatched: Callable[[Any, Reply], None],
    ) -> None:
        self._ctx = ctx
        self._on_tick = on_tick
        self._on_unmatched = on_unmatched
        self._commands: queue.Queue[tuple[Any, ...]] = queue.Queue(maxsize=_MAX_COMMANDS)
        self._wakeup = Wakeup()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lmcd-tx-ctl", daemon=True)
        self._sockets: dict[Any, zmq.Socket[bytes]] = {}
        self._pending: dict[tuple[Any, int], Callback] = {}

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake()
        self._thread.join(timeout=5)
        for sock in self._sockets.values():
            sock.close()
        self._sockets.clear()
        self._wakeup.close()

    # -- any thread -------------------------------------------------------------------------------

    def connect(self, key: Any, address: str) -> None:
        self._submit(("connect", key, address))

    def close(self, key: Any) -> None:
        """Close the peer's socket; its pending callbacks get None."""
        if not self._stop.is_set():
            self._submit(("close", key))

    def send(self, key: Any, rid: int, payload: bytes, callback: Callback | None) -> None:
        """Queue one request; ``callback`` (if any) gets the reply with the same ``rid``."""
        if self._stop.is_set():
            raise PeerClosed("the sender is shutting down")
        self._submit(("send", key, rid, payload, callback))

    def forget(self, key: Any, rid: int) -> None:
        """Drop the callback of a request whose caller gave up (a late reply is 'unmatched')."""
        with contextlib.suppress(DeadlineExceeded):
            self._submit(("forget", key, rid))

    def _submit(self, command: tuple[Any, ...]) -> None:
        try:
            self._commands.put(command, timeout=1.0)
        except queue.Full as exc:
            raise DeadlineExceeded("control command queue full") from exc
        self._wake()

    def _wake(self) -> None:
        self._wakeup.wake()

    # -- the control thread ----------------------------------------------------------------------

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._wakeup.fileno(), zmq.POLLIN)
        by_socket: dict[zmq.Socket[bytes], Any] = {}
        interval_ms = int(HOUSEKEEPING_INTERVAL * 1000)
        next_tick = 0.0
        while not self._stop.is_set():
            try:
                events = dict(poller.poll(interval_ms))
            except zmq.ZMQError:
                if self._stop.is_set():
                    return
                raise
            if self._wakeup.fileno() in events:
                self._wakeup.drain()
            self._run_commands(poller, by_socket)
            for sock, key in list(by_socket.items()):
                if sock in events:
                    self._receive(key, sock)
            now = time.monotonic()
            if now < next_tick:
                continue
            next_tick = now + HOUSEKEEPING_INTERVAL
            try:
                self._on_tick()
            except Exception:
                logger.exception("control housekeeping failed")

    def _run_commands(self, poller: zmq.Poller, by_socket: dict[zmq.Socket[bytes], Any]) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            match command:
                case ("connect", key, address):
                    sock = self._ctx.socket(zmq.DEALER)
                    # A short linger lets cancels queued just before a close still go out.
                    sock.setsockopt(zmq.LINGER, _LINGER_MS)
                    sock.connect(address)
                    self._sockets[key] = sock
                    by_socket[sock] = key
                    poller.register(sock, zmq.POLLIN)
                case ("close", key):
                    closing = self._sockets.pop(key, None)
                    if closing is not None:
                        poller.unregister(closing)
                        by_socket.pop(closing, None)
                        closing.close()
                    for pending_key in [k for k in self._pending if k[0] == key]:
                        self._call(self._pending.pop(pending_key), None)
                case ("send", key, rid, payload, callback):
                    sock_for = self._sockets.get(key)
                    if sock_for is None:
                        if callback is not None:
                            self._call(callback, None)
                        continue
                    if callback is not None:
                        self._pending[(key, rid)] = callback
                    try:
                        sock_for.send(payload, zmq.NOBLOCK)
                    except zmq.ZMQError:
                        # High-water mark reached: the peer is not reading; let deadlines act.
                        dropped = self._pending.pop((key, rid), None)
                        if dropped is not None:
                            self._call(dropped, None)
                case ("forget", key, rid):
                    self._pending.pop((key, rid), None)

    def _receive(self, key: Any, sock: zmq.Socket[bytes]) -> None:
        for _ in range(1024):
            try:
                data = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                reply = decode_reply(data)
            except (msgspec.DecodeError, msgspec.ValidationError):
                logger.warning("malformed control reply from %s", key)
                continue
            callback = self._pending.pop((key, reply.rid), None)
            if callback is not None:
                self._call(callback, reply)
            else:
                self._on_unmatched(key, reply)

    @staticmethod
    def _call(callback: Callback, reply: Reply | None) -> None:
        try:
            callback(reply)
        except Exception:
            logger.exception("control reply callback failed")
