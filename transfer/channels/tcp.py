"""The TCP channel: checksummed frames over one plain socket per peer (see :mod:`..protocol`).

P (:class:`TcpSendChannel`, :class:`TcpLink`): one data connection per receiver, opened after the
handshake with a hello frame carrying the session id; the pump coalesces queued chunks into one
``sendmsg`` and streams large chunks in slices, each hashed right before it is sent.

D (:class:`TcpReceiveChannel`): ``lmcd-rx-accept`` accepts data connections; one
``lmcd-rx-conn-N`` thread per connection (at most :data:`MAX_DATA_CONNECTIONS`) reads frames
straight into reserved pages, verifying the header checksum before any payload byte is written.
"""

from __future__ import annotations

import contextlib
import logging
import math
import socket
import threading
import time
from typing import ClassVar

import msgspec
import xxhash

from lmcache_disagg.transfer.channels.base import (
    ChunkItem,
    ChunkSink,
    FinishItem,
    PumpHost,
    ReceiveChannel,
    SendChannel,
    SendLink,
    StopItem,
)
from lmcache_disagg.transfer.channels.frames import (
    Stopped,
    header_checksum,
    pack_header,
    recv_exact,
    recv_exact_vec,
    send_all,
    set_io_timeouts,
    skip_bytes,
)
from lmcache_disagg.transfer.errors import (
    AuthenticationFailed,
    PeerClosed,
    PeerUnreachable,
    ProtocolViolation,
    TransferError,
)
from lmcache_disagg.transfer.pool import ReceivePool, SendPool
from lmcache_disagg.transfer.protocol import (
    FRAME_CHUNK,
    FRAME_HEADER,
    FRAME_HEADER_SIZE,
    FRAME_HELLO,
    FRAME_MAGIC,
    FRAME_TRAILER,
    MAX_KEY_BYTES,
    PROTOCOL_VERSION,
    TcpAccept,
    decode_params,
    encode_params,
)
from lmcache_disagg.transfer.session import SESSION_ID_BYTES, Session

__all__ = ["MAX_DATA_CONNECTIONS", "TcpLink", "TcpReceiveChannel", "TcpSendChannel"]

logger = logging.getLogger(__name__)

MAX_DATA_CONNECTIONS = 256
_IDLE_PUMP = 0.05
_MAX_BATCH = 64
_MAX_BATCH_BYTES = 64 << 20
# Large chunks go out in slices, each hashed right before its sendmsg so the kernel copies it
# from cache; too small a slice pays in syscalls, too large a one falls out of cache (the README's
# benchmark section has the figures).
_STREAM_SLICE = 2 << 20
_DRAIN_BYTES = 1 << 20
_HASH_SLICE = 1 << 20


# -- P side ------------------------------------------------------------------------------------


class TcpSendChannel(SendChannel):
    name: ClassVar[str] = "tcp"

    def __init__(
        self,
        send_pool: SendPool,
        connect_timeout: float,
        handshake_timeout: float,
        stop: threading.Event,
    ) -> None:
        self._pool = send_pool
        self._connect_timeout = connect_timeout
        self._handshake_timeout = handshake_timeout
        self._stop = stop

    def connect(self, host: str, session: bytes, params: bytes, target: str) -> SendLink:
        if self._pool.view is None:
            raise TransferError(
                "the TCP channel needs host staging pages (pool_device cpu or pinned)"
            )
        try:
            port = decode_params(params, TcpAccept).data_port
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ProtocolViolation(f"malformed TCP channel parameters: {exc}") from exc
        if not 0 < port < 65536:
            raise ProtocolViolation(f"receiver announced data port {port}")
        try:
            sock = socket.create_connection((host, port), timeout=self._connect_timeout)
        except OSError as exc:
            raise PeerUnreachable(f"cannot connect to {host}:{port}: {exc}") from exc
        try:
            set_io_timeouts(sock)
            header = bytearray(FRAME_HEADER_SIZE)
            pack_header(header, FRAME_HELLO, 0, 0, 0, 0, session)
            send_all(sock, (header,), time.monotonic() + self._handshake_timeout, self._stop)
        except BaseException:
            sock.close()
            raise
        return TcpLink(sock, self._pool, target)


class TcpLink(SendLink):
    name: ClassVar[str] = "tcp"

    def __init__(self, sock: socket.socket, send_pool: SendPool, target: str) -> None:
        self._sock = sock
        self._pool = send_pool
        self._target = target

    def pump(self, host: PumpHost, stop: threading.Event) -> None:
        headers = [bytearray(FRAME_HEADER_SIZE) for _ in range(_MAX_BATCH)]
        while True:
            item = host.next_item(_IDLE_PUMP)
            if item is None:
                continue
            # Coalesce whatever is already queued into one sendmsg: at small chunk sizes the
            # per-syscall and per-wakeup cost dominates, not the bytes.
            batch: list[ChunkItem] = []
            tail: FinishItem | StopItem | None = None
            batch_bytes = 0
            while True:
                if not isinstance(item, ChunkItem):
                    tail = item
                    break
                batch.append(item)
                batch_bytes += item.nbytes
                if len(batch) >= _MAX_BATCH or batch_bytes >= _MAX_BATCH_BYTES:
                    break
                item = host.next_item_nowait()
                if item is None:
                    break
            if batch:
                if not self.alive():
                    host.release_pages([chunk.page for chunk in batch])
                    raise PeerClosed(f"KV receiver {self._target} closed the data connection")
                self._send_batch(host, batch, headers, stop)
            if isinstance(tail, StopItem):
                return
            if tail is not None:
                host.send_finish(tail.handle)

    def _send_batch(
        self,
        host: PumpHost,
        batch: list[ChunkItem],
        headers: list[bytearray],
        stop: threading.Event,
    ) -> None:
        """Send queued chunks: small ones gathered into one sendmsg, large ones streamed in
        slices, each hashed right before it is sent (so the kernel copies it from cache)."""
        sock = self._sock
        view = self._pool.view
        assert view is not None
        page_bytes = self._pool.page_bytes
        buffers: list[memoryview | bytearray | bytes] = []
        deadline = math.inf
        sent_bytes = 0
        sent_chunks = 0
        try:
            for n, chunk in enumerate(batch):
                handle = chunk.handle
                if not handle.pending:
                    continue
                deadline = min(deadline, handle.deadline)
                nbytes = chunk.nbytes
                start = chunk.page.index * page_bytes
                payload = view[start : start + nbytes]
                header = headers[n]
                pack_header(
                    header,
                    FRAME_CHUNK,
                    handle.handle,
                    chunk.index,
                    nbytes,
                    chunk.num_tokens,
                    chunk.key,
                )
                buffers.append(header)
                if nbytes <= _STREAM_SLICE:
                    buffers.append(payload)
                    buffers.append(FRAME_TRAILER.pack(xxhash.xxh3_64_intdigest(payload)))
                else:
                    hasher = xxhash.xxh3_64()
                    for offset in range(0, nbytes, _STREAM_SLICE):
                        part = payload[offset : offset + _STREAM_SLICE]
                        hasher.update(part)
                        buffers.append(part)
                        send_all(sock, buffers, deadline, stop)
                        buffers.clear()
                    buffers.append(FRAME_TRAILER.pack(hasher.intdigest()))
                sent_bytes += nbytes
                sent_chunks += 1
            if buffers:
                send_all(sock, buffers, deadline, stop)
        finally:
            host.release_pages([chunk.page for chunk in batch])
        if sent_chunks:
            host.metrics.chunks_total.inc(sent_chunks)
            host.metrics.bytes_total.inc(sent_bytes)

    def alive(self) -> bool:
        """False once D closed or reset the data connection (D never sends on it, so any
        readability means EOF or an error). Cheap: one non-blocking peek."""
        try:
            return bool(self._sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False

    def interrupt(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._sock.close()


# -- D side ------------------------------------------------------------------------------------


def _recv_some(sock: socket.socket, buffers: list[memoryview]) -> int:
    """One non-waiting ``recvmsg_into``: whatever is already there (0 when nothing yet)."""
    try:
        got = sock.recvmsg_into(buffers, 0, socket.MSG_DONTWAIT)[0]
    except (BlockingIOError, TimeoutError, InterruptedError):
        return 0
    except OSError as exc:
        raise PeerClosed(f"connection error while reading: {exc}") from exc
    if got == 0:
        raise PeerClosed("connection closed mid-frame")
    return int(got)


class TcpReceiveChannel(ReceiveChannel):
    name: ClassVar[str] = "tcp"
    fenced: ClassVar[bool] = True

    def __init__(
        self,
        pool: ReceivePool,
        host: str,
        port: int,
        advertised_port: int | None,
        stall_timeout: float,
    ) -> None:
        """Binds ``host:port`` now (raises TransferError when it cannot)."""
        if pool.view is None:
            raise TransferError(
                "the TCP channel needs a host receive pool (pool_device cpu/pinned)"
            )
        self._pool = pool
        self._advertised = advertised_port
        self._stall = stall_timeout
        try:
            self._listener = socket.create_server((host, port), backlog=64)
        except OSError as exc:
            raise TransferError(f"cannot bind KV data listener on {host}:{port}: {exc}") from exc
        self._listener.settimeout(0.25)
        self._lock = threading.Lock()
        self._conns: dict[socket.socket, threading.Thread] = {}
        self._conn_ids = 0
        self._thread: threading.Thread | None = None
        self._sink: ChunkSink | None = None
        self._stop = threading.Event()

    @property
    def data_port(self) -> int:
        """The port actually bound."""
        return int(self._listener.getsockname()[1])

    def start(self, sink: ChunkSink, stop: threading.Event) -> None:
        self._sink = sink
        self._stop = stop
        self._thread = threading.Thread(target=self._accept, name="lmcd-rx-accept", daemon=True)
        self._thread.start()

    def accept(self, session: Session, params: bytes) -> bytes | None:
        return encode_params(TcpAccept(self._advertised or self.data_port))

    def shutdown(self) -> None:
        with self._lock:
            conns = list(self._conns)
        for sock in conns:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            threads = list(self._conns.values())
        for thread in threads:
            thread.join(timeout=5)
        self._listener.close()

    def _accept(self) -> None:
        sink = self._sink
        assert sink is not None
        while not self._stop.is_set():
            try:
                sock, _addr = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                time.sleep(0.05)
                continue
            with self._lock:
                if len(self._conns) >= MAX_DATA_CONNECTIONS:
                    sink.metrics.failure("too_many_connections")
                    sock.close()
                    continue
                self._conn_ids += 1
                thread = threading.Thread(
                    target=self._serve_conn,
                    args=(sink, sock),
                    name=f"lmcd-rx-conn-{self._conn_ids - 1}",
                    daemon=True,
                )
                self._conns[sock] = thread
            thread.start()

    def _serve_conn(self, sink: ChunkSink, sock: socket.socket) -> None:
        try:
            set_io_timeouts(sock)
            self._read_frames(sink, sock)
        except Stopped:
            pass
        except ProtocolViolation as exc:
            logger.warning("closing KV data connection: %s", exc)
            sink.metrics.failure("protocol")
        except PeerClosed as exc:
            logger.debug("KV data connection closed: %s", exc)
        except Exception:
            logger.exception("KV data connection failed")
            sink.metrics.failure("internal")
        finally:
            sock.close()
            with self._lock:
                self._conns.pop(sock, None)

    def _read_frames(self, sink: ChunkSink, sock: socket.socket) -> None:
        stop = self._stop
        stall = self._stall
        header = bytearray(FRAME_HEADER_SIZE)
        hview = memoryview(header)
        unpack = FRAME_HEADER.unpack_from
        pool_view = self._pool.view
        assert pool_view is not None
        page_bytes = self._pool.page_bytes
        if not recv_exact(sock, hview, stop, idle_ok=False, stall_timeout=stall):
            return
        magic, version, kind, _f, _h, _i, nbytes, _n, key_len, _r, checksum, keyf = unpack(header)
        if magic != FRAME_MAGIC or version != PROTOCOL_VERSION or kind != FRAME_HELLO:
            raise ProtocolViolation("data connection did not start with a hello frame")
        sid_len = SESSION_ID_BYTES
        if nbytes != 0 or key_len != sid_len or header_checksum(header, keyf[:sid_len]) != checksum:
            raise ProtocolViolation("malformed data hello")
        try:
            session = sink.data_session(bytes(keyf[:sid_len]))
        except (ProtocolViolation, AuthenticationFailed):
            sink.metrics.failure("auth")
            logger.warning("refused a KV data connection without an authenticated session")
            return
        scratch = memoryview(bytearray(_DRAIN_BYTES))
        # Two header buffers: while a small payload is read, the same syscall may also pull in
        # the next frame's header (recvmsg_into), which halves the syscalls per chunk when
        # frames stream back to back.
        spare = bytearray(FRAME_HEADER_SIZE)
        sview = memoryview(spare)
        trailer = bytearray(FRAME_TRAILER.size)
        tview = memoryview(trailer)
        have_header = 0
        while True:
            if have_header < FRAME_HEADER_SIZE and not recv_exact(
                sock, hview[have_header:], stop, idle_ok=have_header == 0, stall_timeout=stall
            ):
                return
            have_header = 0
            (
                magic,
                version,
                kind,
                _f,
                handle,
                index,
                nbytes,
                num_tokens,
                key_len,
                _r,
                checksum,
                keyf,
            ) = unpack(header)
            if magic != FRAME_MAGIC or version != PROTOCOL_VERSION or kind != FRAME_CHUNK:
                raise ProtocolViolation("bad frame magic/version/kind")
            if key_len > MAX_KEY_BYTES:
                raise ProtocolViolation(f"key of {key_len} bytes")
            key = bytes(keyf[:key_len])
            if header_checksum(header, key) != checksum:
                raise ProtocolViolation("frame header checksum mismatch")
            begun = sink.begin_chunk(session, handle, index, nbytes, num_tokens)
            if isinstance(begun, str):
                sink.metrics.failure(begun)
                remaining = nbytes + FRAME_TRAILER.size
                while remaining:
                    step = min(remaining, _DRAIN_BYTES)
                    recv_exact(sock, scratch[:step], stop, idle_ok=False, stall_timeout=stall)
                    remaining -= step
                continue
            start = begun.page * page_bytes
            target = pool_view[start : start + nbytes]
            error = "truncated"
            try:
                if nbytes <= _HASH_SLICE:
                    # Often payload, trailer and the next header are all there already.
                    got = _recv_some(sock, [target, tview, sview])
                    if got < nbytes + FRAME_TRAILER.size:
                        rest = skip_bytes([target, tview], got)
                        recv_exact_vec(sock, rest, stop, stall_timeout=stall)
                    else:
                        have_header = got - nbytes - FRAME_TRAILER.size
                    digest = xxhash.xxh3_64_intdigest(target)
                else:
                    # Hash each slice as it lands, while it is still in cache.
                    hasher = xxhash.xxh3_64()
                    for offset in range(0, nbytes, _HASH_SLICE):
                        part = target[offset : offset + _HASH_SLICE]
                        recv_exact(sock, part, stop, idle_ok=False, stall_timeout=stall)
                        hasher.update(part)
                    recv_exact(sock, tview, stop, idle_ok=False, stall_timeout=stall)
                    digest = hasher.intdigest()
                error = "" if digest == FRAME_TRAILER.unpack(trailer)[0] else "checksum"
            finally:
                sink.end_chunk(begun, nbytes, num_tokens, key, error)
            if error:
                logger.warning(
                    "chunk %d of transfer %s failed: %s",
                    index,
                    begun.reservation.transfer_id,
                    error,
                )
            if have_header:
                header, spare = spare, header
                hview, sview = sview, hview
