"""A wake-up socketpair that lets another thread interrupt a poll loop (torch-free).

The owner registers :meth:`Wakeup.fileno` with its poller; any thread calls :meth:`wake`; the loop
calls :meth:`drain` when the fd is readable. Used by P's control thread and D's control thread.
"""

from __future__ import annotations

import contextlib
import socket

__all__ = ["Wakeup"]


class Wakeup:
    def __init__(self) -> None:
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)

    def fileno(self) -> int:
        return self._r.fileno()

    def wake(self) -> None:
        # A full buffer means a wake-up is already pending; closed means shutting down.
        with contextlib.suppress(OSError):
            self._w.send(b"\0")

    def drain(self) -> None:
        with contextlib.suppress(OSError):
            while self._r.recv(4096):
                pass

    def close(self) -> None:
        self._r.close()
        self._w.close()
