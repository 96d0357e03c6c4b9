"""Socket and frame helpers of the TCP channel (torch-free): exact reads, full writes, headers.

The hot path allocates nothing per chunk beyond a few memoryview slices: headers are packed into a
per-connection buffer, payloads are sent from and received into memoryviews of the pools.
"""

from __future__ import annotations

import errno
import socket
import struct
import threading
import time
from collections.abc import Sequence
from typing import Final

import xxhash

from lmcache_disagg.transfer.errors import DeadlineExceeded, PeerClosed
from lmcache_disagg.transfer.protocol import (
    FRAME_CHECKSUM_SPAN,
    FRAME_HEADER,
    FRAME_MAGIC,
    MAX_KEY_BYTES,
    PROTOCOL_VERSION,
)

__all__ = [
    "POLL_SLICE",
    "Stopped",
    "header_checksum",
    "pack_header",
    "recv_exact",
    "recv_exact_vec",
    "send_all",
    "set_io_timeouts",
    "skip_bytes",
]

POLL_SLICE = 0.25
"""Kernel-level socket timeout: how often a blocked reader/writer re-checks stop and deadlines."""

_TIMEVAL = struct.Struct("@ll")


class Stopped(Exception):
    """The owning endpoint is shutting down."""


def set_io_timeouts(sock: socket.socket, seconds: float = POLL_SLICE) -> None:
    """Blocking socket whose recv/send give up after ``seconds`` (SO_RCVTIMEO/SO_SNDTIMEO).

    Unlike ``settimeout`` this keeps the socket in blocking mode, so ``MSG_WAITALL`` and full
    ``sendmsg`` work with one syscall per buffer while loops stay stoppable.
    """
    sock.settimeout(None)
    tv = _TIMEVAL.pack(int(seconds), int((seconds % 1) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def recv_exact(
    sock: socket.socket,
    view: memoryview,
    stop: threading.Event,
    *,
    idle_ok: bool,
    stall_timeout: float,
) -> bool:
    """Fill ``view`` completely. Returns False on a clean EOF before the first byte (if idle_ok).

    ``idle_ok`` (between frames) lets the peer stay silent indefinitely; once a byte has arrived
    (or when not idle_ok) the peer must make progress every ``stall_timeout`` seconds.
    Raises PeerClosed (EOF/reset/stall) or Stopped.
    """
    n = len(view)
    got = 0
    last = time.monotonic()
    while got < n:
        try:
            k = sock.recv_into(view[got:], n - got, socket.MSG_WAITALL)
        except (BlockingIOError, TimeoutError, InterruptedError):
            k = -1
        except OSError as exc:
            raise PeerClosed(f"connection error while reading: {exc}") from exc
        if k == 0:
            if got == 0 and idle_ok:
                return False
            raise PeerClosed(f"connection closed after {got} of {n} bytes")
        if k > 0:
            got += k
            last = time.monotonic()
            continue
        if stop.is_set():
            raise Stopped()
        if not (got == 0 and idle_ok) and time.monotonic() - last > stall_timeout:
            raise PeerClosed(f"peer stalled for {stall_timeout:.3g}s after {got} of {n} bytes")
    return True


def send_all(
    sock: socket.socket,
    buffers: Sequence[memoryview | bytes | bytearray],
    deadline: float,
    stop: threading.Event,
) -> None:
    """``sendmsg`` every byte of ``buffers`` (handling partial sends) before ``deadline``.

    Buffers must be byte-formatted (bytes, bytearray, or memoryviews of format "B").
    """
    views = list(buffers)
    while views:
        try:
            sent = sock.sendmsg(views)
        except (BlockingIOError, TimeoutError, InterruptedError):
            sent = 0
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                sent = 0
            else:
                raise PeerClosed(f"connection error while sending: {exc}") from exc
        if sent == 0:
            if stop.is_set():
                raise Stopped()
            if time.monotonic() > deadline:
                raise DeadlineExceeded("peer did not accept data before the push deadline")
            continue
        while sent:
            head = views[0]
            if sent >= len(head):
                sent -= len(head)
                views.pop(0)
            else:
                views[0] = memoryview(head)[sent:]
                sent = 0


# The header split at the checksum: the first FRAME_CHECKSUM_SPAN bytes (what the checksum
# covers) and the rest (checksum, key). Packing the prefix once and hashing it together with the
# key in one call halves the per-chunk cost of pack_header on the small-chunk hot path.
_PREFIX: Final = struct.Struct("<4sBBHQIQIHH")
_SUFFIX: Final = struct.Struct(f"<Q{MAX_KEY_BYTES}s")
assert FRAME_HEADER.format == _PREFIX.format + _SUFFIX.format[1:]
assert _PREFIX.size == FRAME_CHECKSUM_SPAN


def header_checksum(header: memoryview | bytearray, key: bytes) -> int:
    """xxh3-64 over the header's first FRAME_CHECKSUM_SPAN bytes and the key."""
    return xxhash.xxh3_64_intdigest(bytes(memoryview(header)[:FRAME_CHECKSUM_SPAN]) + key)


def pack_header(
    buf: bytearray,
    kind: int,
    handle: int,
    index: int,
    nbytes: int,
    num_tokens: int,
    key: bytes,
) -> None:
    """Pack a frame header (header checksum included) into ``buf`` (len FRAME_HEADER_SIZE)."""
    if len(key) > MAX_KEY_BYTES:
        raise ValueError(f"chunk key longer than {MAX_KEY_BYTES} bytes")
    prefix = _PREFIX.pack(
        FRAME_MAGIC, PROTOCOL_VERSION, kind, 0, handle, index, nbytes, num_tokens, len(key), 0
    )
    buf[:FRAME_CHECKSUM_SPAN] = prefix
    _SUFFIX.pack_into(buf, FRAME_CHECKSUM_SPAN, xxhash.xxh3_64_intdigest(prefix + key), key)


def recv_exact_vec(
    sock: socket.socket,
    views: list[memoryview],
    stop: threading.Event,
    *,
    stall_timeout: float,
) -> None:
    """Fill every view in order (``recvmsg_into`` with MSG_WAITALL); raises like recv_exact."""
    views = [v for v in views if len(v)]
    last = time.monotonic()
    while views:
        try:
            got = sock.recvmsg_into(views, 0, socket.MSG_WAITALL)[0]
        except (BlockingIOError, TimeoutError, InterruptedError):
            got = -1
        except OSError as exc:
            raise PeerClosed(f"connection error while reading: {exc}") from exc
        if got == 0:
            raise PeerClosed("connection closed mid-frame")
        if got < 0:
            if stop.is_set():
                raise Stopped()
            if time.monotonic() - last > stall_timeout:
                raise PeerClosed(f"peer stalled for {stall_timeout:.3g}s mid-frame")
            continue
        last = time.monotonic()
        views = skip_bytes(views, got)


def skip_bytes(views: list[memoryview], count: int) -> list[memoryview]:
    """The views left to fill after ``count`` bytes went into their front."""
    out = []
    for view in views:
        if count >= len(view):
            count -= len(view)
            continue
        out.append(view[count:] if count else view)
        count = 0
    return out
