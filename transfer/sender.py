"""P side: :class:`KVSender` pushes chunk pages into a receiver's reserved pool pages.

Threads: one ``lmcd-tx-<host:port>`` data thread per connected receiver drains that peer's bounded
write queue (TCP ``sendmsg``, coalescing queued chunks, or NIXL WRITE), so :meth:`PushHandle.write`
returns at once and the send overlaps the caller's compute. One ``lmcd-tx-ctl`` thread
(:mod:`.control`) owns the zmq control sockets: callers' requests (hello, reserve) wait on it with
their deadline, finish notices and cancels are fire-and-forget, and it fails pushes that pass their
deadline even when nobody polls them.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import logging
import math
import queue
import secrets
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import xxhash
import zmq
from prometheus_client import CollectorRegistry

from lmcache_disagg.config import ConfigError, LMCacheDisaggConfig, split_host_port
from lmcache_disagg.netaddr import is_loopback
from lmcache_disagg.transfer import auth
from lmcache_disagg.transfer.control import ControlLoop
from lmcache_disagg.transfer.errors import (
    AuthenticationFailed,
    DeadlineExceeded,
    FingerprintMismatch,
    NoRoom,
    PeerClosed,
    PeerUnreachable,
    ProtocolViolation,
    TargetNotAllowed,
    TransferError,
    UnknownSession,
    error_from_kind,
)
from lmcache_disagg.transfer.metrics import TransferMetrics
from lmcache_disagg.transfer.pool import SendPage, SendPool
from lmcache_disagg.transfer.protocol import (
    FRAME_CHUNK,
    FRAME_HEADER_SIZE,
    FRAME_HELLO,
    FRAME_TRAILER,
    MAX_KEY_BYTES,
    NIXL_NOTIF,
    PROTOCOL_VERSION,
    Auth,
    AuthReply,
    Cancel,
    ErrorReply,
    Finish,
    FinishReply,
    Hello,
    HelloReply,
    LayoutFingerprint,
    Reply,
    Request,
    Reserve,
    ReserveReply,
    encode,
)
from lmcache_disagg.transfer.state import PushState, PushStatus
from lmcache_disagg.transfer.tcp_channel import (
    Stopped,
    pack_header,
    send_all,
    set_io_timeouts,
)

if TYPE_CHECKING:
    from lmcache_disagg.transfer.nixl_agent import NixlAgent

__all__ = ["KVSender", "PushHandle"]

logger = logging.getLogger(__name__)

_STOP = object()
_IDLE_PUMP = 0.05
# While WRITEs are in flight, how long the data thread waits for more work before it polls them.
_NIXL_POLL = 0.0002
_MAX_BATCH = 64
_MAX_BATCH_BYTES = 64 << 20
# Large chunks go out in slices, each hashed right before its sendmsg so the kernel copies it
# from cache. 2 MiB measured best on the paired bench (bench transfer --channel tcp --chunk-bytes
# 32MiB): 1 MiB slices paid more in syscalls and socket-lock round trips (about 80% of the raw
# socket against about 90%), 8 MiB ones fell out of cache (about 74%).
_STREAM_SLICE = 2 << 20


def error_from_reply(reply: ErrorReply) -> TransferError:
    return error_from_kind(reply.kind, reply.message, reply.fields)


def _raise_error_reply(reply: ErrorReply) -> None:
    raise error_from_reply(reply)


def _make_reserve(rid: int, *, session: bytes, transfer_id: str, n: int, ttl: float) -> Request:
    return Reserve(rid, session, transfer_id, n, ttl)


def split_target(target: str) -> tuple[str, int]:
    try:
        return split_host_port(target)
    except ConfigError:
        raise TargetNotAllowed(f"push target {target!r} is not host:port") from None


class _Peer:
    """One receiver: its control socket, session, data channel and data thread."""

    def __init__(self, sender: KVSender, target: str) -> None:
        self.sender = sender
        self.target = target
        self.host, self.port = split_target(target)
        assert sender._ctl is not None
        self.ctl = sender._ctl
        self.ctl.connect(self, f"tcp://{self.host}:{self.port}")
        self.rids = itertools.count(1)
        self.session = b""
        self.channel = "tcp"
        self.data_sock: socket.socket | None = None
        self.nixl_remote = ""
        self.pool_base = 0
        self.remote_mem = "DRAM"
        self.remote_dev = 0
        self.remote_pages = 0
        # SimpleQueue (C, ~0.3 us per put+get against ~2.3 us for queue.Queue) is on the path of
        # every chunk. It is bounded here, in enqueue(): chunk items each hold a staging page
        # (at most n_pages of them), so only finish notices can pile up past that.
        self.queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.max_queued = sender.send_pool.n_pages * 2 + 64
        self.thread: threading.Thread | None = None
        self.broken = ""
        self.closed = False
        self.handles: set[PushHandle] = set()
        self.handles_lock = threading.Lock()

    # -- control requests (any thread; the I/O happens on the control thread) -------------------

    def request(self, make: Callable[[int], Request], timeout: float, what: str) -> Reply:
        """Send one request and wait up to ``timeout`` for its reply."""
        rid = next(self.rids)
        done = threading.Event()
        lock = threading.Lock()
        box: list[Reply | None] = []
        abandoned = False

        def on_reply(reply: Reply | None) -> None:
            with lock:
                if not abandoned:
                    box.append(reply)
                    done.set()
                    return
            if isinstance(reply, ReserveReply):
                self.sender._on_unmatched(self, reply)

        self.ctl.send(self, rid, encode(make(rid)), on_reply)
        if not done.wait(timeout):
            with lock:
                abandoned = not done.is_set()
            if abandoned:
                self.ctl.forget(self, rid)
                raise DeadlineExceeded(f"{what}: no reply from {self.target} within {timeout:.3g}s")
        reply = box[0]
        if reply is None:
            raise PeerClosed(f"{what}: control channel to {self.target} closed")
        return reply

    def send_async(
        self, make: Callable[[int], Request], callback: Callable[[Reply | None], None] | None
    ) -> None:
        """Fire a request; ``callback`` runs on the control thread with the reply (or None)."""
        rid = next(self.rids)
        self.ctl.send(self, rid, encode(make(rid)), callback)

    # -- data thread ----------------------------------------------------------------------------

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name=f"lmcd-tx-{self.target}", daemon=True)
        self.thread.start()

    def enqueue(self, item: Any, deadline: float) -> None:
        while self.queue.qsize() >= self.max_queued:
            # Only a stalled data thread gets here (see max_queued); wait for it to catch up.
            if time.monotonic() >= deadline:
                raise DeadlineExceeded(f"send queue to {self.target} full until the deadline")
            time.sleep(0.001)
        self.queue.put(item)

    def _run(self) -> None:
        sender = self.sender
        stop = sender._stop
        try:
            if self.channel == "nixl":
                self._run_nixl(stop)
            else:
                self._run_tcp(stop)
        except Stopped:
            pass
        except TransferError as exc:
            self.mark_broken(exc.reason, str(exc))
        except Exception as exc:
            logger.exception("KV send thread for %s failed", self.target)
            self.mark_broken("internal", str(exc))
        finally:
            self._drain_queue()
            self._close_sockets()
            self.sender._thread_exited(self)

    def _next(self, stop: threading.Event, timeout: float) -> Any:
        if self.broken:
            return _STOP
        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            if stop.is_set():
                return _STOP
            return None

    def _run_tcp(self, stop: threading.Event) -> None:
        sock = self.data_sock
        assert sock is not None
        headers = [bytearray(FRAME_HEADER_SIZE) for _ in range(_MAX_BATCH)]
        while True:
            item = self._next(stop, _IDLE_PUMP)
            if item is None:
                continue
            # Coalesce whatever is already queued into one sendmsg: at small chunk sizes the
            # per-syscall and per-wakeup cost dominates, not the bytes.
            batch: list[Any] = []
            tail = None
            batch_bytes = 0
            while True:
                if item is _STOP or item[0] != "chunk":
                    tail = item
                    break
                batch.append(item)
                batch_bytes += item[4]
                if len(batch) >= _MAX_BATCH or batch_bytes >= _MAX_BATCH_BYTES:
                    break
                try:
                    item = self.queue.get_nowait()
                except queue.Empty:
                    break
            if batch:
                if not self.data_alive():
                    self.sender._release_pages([chunk[3] for chunk in batch])
                    raise PeerClosed(f"KV receiver {self.target} closed the data connection")
                self._send_batch(sock, batch, headers, stop)
            if tail is _STOP:
                return
            if tail is not None:
                self._send_finish(tail[1])

    def _send_batch(
        self,
        sock: socket.socket,
        batch: list[Any],
        headers: list[bytearray],
        stop: threading.Event,
    ) -> None:
        """Send queued chunks: small ones gathered into one sendmsg, large ones streamed in
        slices, each hashed right before it is sent (so the kernel copies it from cache)."""
        sender = self.sender
        view = sender.send_pool.view
        assert view is not None
        page_bytes = sender.send_pool.page_bytes
        buffers: list[memoryview | bytearray | bytes] = []
        deadline = math.inf
        sent_bytes = 0
        sent_chunks = 0
        try:
            for n, (_, handle, index, page, nbytes, num_tokens, key) in enumerate(batch):
                if handle.state is not PushState.PENDING:
                    continue
                deadline = min(deadline, handle.deadline)
                start = page.index * page_bytes
                payload = view[start : start + nbytes]
                header = headers[n]
                pack_header(
                    header, FRAME_CHUNK, handle.handle, index, index, nbytes, num_tokens, key
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
            sender._release_pages([item[3] for item in batch])
        if sent_chunks:
            sender.metrics.chunks_total.inc(sent_chunks)
            sender.metrics.bytes_total.inc(sent_bytes)

    def _run_nixl(self, stop: threading.Event) -> None:
        sender = self.sender
        agent = sender._nixl
        assert agent is not None
        page_bytes = sender.send_pool.page_bytes
        remote_page_bytes = sender.fingerprint.page_bytes
        # Oldest first. WRITEs to one peer complete in posting order in practice, so reaping
        # stops at the first one still running: O(1) per posted chunk instead of a scan of the
        # whole window (up to the send pool's page count) after every post.
        inflight: collections.deque[tuple[Any, SendPage, PushHandle, int]] = collections.deque()
        finishing: list[PushHandle] = []
        metrics = sender.metrics

        def reap() -> None:
            done_pages: list[SendPage] = []
            done_bytes = done_chunks = 0
            broken = False
            try:
                while inflight:
                    xfer, page, handle, nbytes = inflight[0]
                    state = agent.check(xfer)
                    if state == "PROC":
                        break
                    inflight.popleft()
                    agent.release_xfer(xfer)
                    done_pages.append(page)
                    if state == "DONE":
                        done_chunks += 1
                        done_bytes += nbytes
                    else:
                        handle._fail("nixl_error")
                        broken = True
            finally:
                if done_pages:
                    # Only now, with the WRITE finished, may the producer reuse the page.
                    sender._release_pages(done_pages)
                    if done_chunks:
                        metrics.chunks_total.inc(done_chunks)
                        metrics.bytes_total.inc(done_bytes)
            if broken:
                raise PeerClosed(f"NIXL transfer to {self.target} failed")
            if finishing:
                busy = {id(h) for _, _, h, _ in inflight}
                for handle in list(finishing):
                    if id(handle) not in busy:
                        finishing.remove(handle)
                        self._send_finish(handle)

        try:
            while True:
                if self.broken:
                    return
                try:
                    item = self.queue.get_nowait()
                except queue.Empty:
                    if inflight or finishing:
                        reap()
                    item = self._next(stop, _NIXL_POLL if inflight else _IDLE_PUMP)
                    if item is None:
                        continue
                if item is _STOP:
                    return
                if item[0] == "finish":
                    finishing.append(item[1])
                    reap()
                    continue
                _, handle, index, page, nbytes, num_tokens, key = item
                if handle.state is not PushState.PENDING:
                    sender._release_page(page)
                    continue
                notif = NIXL_NOTIF.pack(
                    b"K", handle.handle, index, index, nbytes, num_tokens, len(key)
                )
                remote_addr = self.pool_base + handle.pages[index] * remote_page_bytes
                try:
                    xfer = agent.write(
                        local_addr=agent.local_base + page.index * page_bytes,
                        remote_addr=remote_addr,
                        nbytes=nbytes,
                        remote_agent=self.nixl_remote,
                        remote_mem=self.remote_mem,
                        remote_dev=self.remote_dev,
                        notif=notif + key,
                    )
                except Exception as exc:
                    sender._release_page(page)
                    raise PeerClosed(f"NIXL WRITE to {self.target} failed: {exc}") from exc
                inflight.append((xfer, page, handle, nbytes))
                # Over shared memory UCX usually finishes the copy inside transfer(): hand the
                # page back to the producer now rather than after the next queue wait.
                reap()
        finally:
            for xfer, page, handle, _nbytes in inflight:
                agent.release_xfer(xfer)
                sender._release_page(page)
                handle._fail("peer_closed")

    def _send_finish(self, handle: PushHandle) -> None:
        if handle.state is not PushState.PENDING:
            return
        self.send_async(
            lambda rid: Finish(rid, self.session, handle.handle, handle.n_written),
            handle._on_finish_reply,
        )

    def _drain_queue(self) -> None:
        while True:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                return
            if item is not _STOP and item[0] == "chunk":
                self.sender._release_page(item[3])

    def check_deadlines(self) -> None:
        now = time.monotonic()
        with self.handles_lock:
            handles = list(self.handles)
        for handle in handles:
            if handle.state is PushState.PENDING and now > handle.deadline:
                handle._fail("deadline")
                handle._cancel_remote()

    def data_alive(self) -> bool:
        """False once D closed or reset the TCP data connection (D never sends on it, so any
        readability means EOF or an error). Cheap: one non-blocking peek."""
        sock = self.data_sock
        if sock is None:
            return not self.broken
        try:
            return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False

    def mark_broken(self, reason: str, message: str) -> None:
        if not self.broken:
            logger.warning("KV push path to %s broken (%s): %s", self.target, reason, message)
        self.sender._forget_peer(self)
        with self.handles_lock:
            handles = list(self.handles)
        for handle in handles:
            handle._fail(reason)
            # The control path may still work when only the data path broke: tell D now so
            # its connector sees FAILED at once and the pages free before the TTL.
            handle._cancel_remote()
        self.broken = reason
        if self.data_sock is not None:
            with contextlib.suppress(OSError):
                self.data_sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Stop the data thread (if any) and close the sockets. Called by the sender only."""
        if self.thread is not None:
            self.queue.put(_STOP)
            self.thread.join(timeout=5)
        self._close_sockets()

    def _close_sockets(self) -> None:
        if self.data_sock is not None:
            self.data_sock.close()
        if not self.closed:
            self.closed = True
            self.ctl.close(self)
        if self.nixl_remote and self.sender._nixl is not None:
            try:
                self.sender._nixl.remove_remote(self.nixl_remote)
            except Exception as exc:
                logger.debug("NIXL remove_remote(%s) failed: %s", self.nixl_remote, exc)
            self.nixl_remote = ""


class PushHandle:
    """One push of ``n_chunks`` chunks into a reservation on D (from :meth:`KVSender.open`).

    Thread-safety: write/finish/cancel are called by one producer thread; status() may be called
    from any thread. A handle that failed (peer died, deadline) silently drops further writes
    (returning their pages) so the producer never blocks on a dead peer; status() says why.
    """

    def __init__(
        self,
        peer: _Peer,
        transfer_id: str,
        handle: int,
        pages: list[int],
        n_chunks: int,
        deadline: float,
    ) -> None:
        self._peer = peer
        self.transfer_id = transfer_id
        self.handle = handle
        self.pages = pages
        self.n_chunks = n_chunks
        self.deadline = deadline
        self.state = PushState.PENDING
        self.reason = ""
        self.n_written = 0
        self._written = bytearray(n_chunks)
        self._finished = False
        self._cancelled = False
        self._lock = threading.Lock()
        self._resolved = threading.Event()

    def write(self, index: int, page: SendPage, nbytes: int, num_tokens: int, key: bytes) -> None:
        """Queue chunk ``index`` (``page.data[:nbytes]``) for sending; returns immediately.

        The page goes back to the sender's pool once sent (or dropped). Raises ValueError on bad
        arguments and TransferError after finish()/cancel() or when the queue stays full past the
        push deadline.
        """
        sender = self._peer.sender
        if not 0 <= index < self.n_chunks:
            sender._release_page(page)
            raise ValueError(f"chunk index {index} outside [0, {self.n_chunks})")
        if not 0 < nbytes <= sender.send_pool.page_bytes or len(key) > MAX_KEY_BYTES:
            sender._release_page(page)
            raise ValueError(f"bad chunk: {nbytes} bytes, key of {len(key)} bytes")
        if sender._pages_by_index.get(page.index) is not page:
            raise ValueError("page does not come from this sender's acquire_page()")
        if self._finished or self._cancelled:
            sender._release_page(page)
            raise TransferError(f"write after finish/cancel on transfer {self.transfer_id!r}")
        if self._written[index]:
            sender._release_page(page)
            raise ValueError(f"chunk {index} of {self.transfer_id!r} written twice")
        if self.state is not PushState.PENDING:
            sender._release_page(page)
            return
        self._written[index] = 1
        self.n_written += 1
        try:
            self._peer.enqueue(("chunk", self, index, page, nbytes, num_tokens, key), self.deadline)
        except DeadlineExceeded:
            sender._release_page(page)
            self._fail("deadline")

    def finish(self) -> None:
        """Mark the end of the writes: chunks [0, n_written) must all have been written."""
        if self._finished or self._cancelled:
            return
        self._finished = True
        if self.n_written == 0 or self._written[: self.n_written].count(1) != self.n_written:
            self._fail("incomplete")
            self._cancel_remote()
            raise ValueError(
                f"finish() needs chunks 0..n-1 written; got {self.n_written} non-contiguous chunks"
            )
        if self.state is PushState.PENDING:
            try:
                self._peer.enqueue(("finish", self), self.deadline)
            except DeadlineExceeded:
                self._fail("deadline")

    def cancel(self) -> None:
        """Abort: D drops the reservation. Idempotent, best effort, never raises."""
        if self._cancelled:
            return
        self._cancelled = True
        if self.state is PushState.DONE:
            return  # D owns a complete transfer now; its connector releases it
        self._fail("cancelled")
        self._cancel_remote()

    def status(self) -> PushStatus:
        """Non-blocking: PENDING, DONE (D verified every chunk) or FAILED(reason)."""
        if self.state is PushState.PENDING and time.monotonic() > self.deadline:
            self._fail("deadline")
            self._cancel_remote()
        return PushStatus(self.state, self.reason)

    def wait(self, timeout: float) -> PushStatus:
        """Block until DONE/FAILED or ``timeout`` seconds; returns :meth:`status`."""
        self._resolved.wait(max(0.0, min(timeout, self.deadline - time.monotonic() + 0.01)))
        return self.status()

    # -- internal -------------------------------------------------------------------------------

    def _cancel_remote(self) -> None:
        peer = self._peer
        if peer.broken:
            return
        with contextlib.suppress(TransferError):
            peer.send_async(lambda rid: Cancel(rid, peer.session, self.handle), lambda _r: None)

    def _fail(self, reason: str) -> None:
        with self._lock:
            if self.state is not PushState.PENDING:
                return
            self.state = PushState.FAILED
            self.reason = reason
        self._resolved.set()
        self._peer.sender.metrics.failure(reason)
        self._peer.sender.metrics.transfer_outcome("failed")
        self._forget()

    def _on_finish_reply(self, reply: Reply | None) -> None:
        if reply is None:
            self._fail("peer_closed")
        elif isinstance(reply, FinishReply) and reply.state == "COMPLETE":
            with self._lock:
                if self.state is not PushState.PENDING:
                    return
                self.state = PushState.DONE
            self._resolved.set()
            self._peer.sender.metrics.transfer_outcome("done")
            self._forget()
        elif isinstance(reply, FinishReply):
            self._fail(reply.reason or "receiver_failed")
        else:
            self._fail(reply.kind if isinstance(reply, ErrorReply) else "protocol")

    def _forget(self) -> None:
        with self._peer.handles_lock:
            self._peer.handles.discard(self)


class KVSender:
    """Pushes KV chunks to receivers (runs inside P's vLLM worker).

    Lifecycle: construct, :meth:`start`, :meth:`open` pushes, :meth:`shutdown`. Peers (handshake,
    channel choice, data connection) are cached per target until the path breaks.
    """

    def __init__(
        self,
        config: LMCacheDisaggConfig,
        fingerprint: LayoutFingerprint,
        *,
        registry: CollectorRegistry | None = None,
    ) -> None:
        fingerprint.validate()
        self.config = config
        self.fingerprint = fingerprint
        self.metrics = TransferMetrics("send", registry)
        n_pages = max(2, config.send_buffer_size // fingerprint.page_bytes)
        device = config.pool_device
        self.send_pool = SendPool(n_pages, fingerprint.page_bytes, device)
        self._pages_by_index = {p.index: p for p in self.send_pool._pages}
        self.metrics.pool_pages_total.set(n_pages)
        self._stop = threading.Event()
        self._peers: dict[str, _Peer] = {}
        self._running: set[_Peer] = set()
        self._peers_lock = threading.Lock()
        self._connect_locks: dict[str, threading.Lock] = {}
        self._ctx: zmq.Context[zmq.Socket[bytes]] | None = None
        self._ctl: ControlLoop | None = None
        self._nixl: NixlAgent | None = None
        self._started = False

    def start(self) -> None:
        """Create the zmq context, the control thread and (channel auto/nixl) the NIXL agent."""
        if self._started:
            return
        self._started = True
        self._ctx = zmq.Context()
        self._ctl = ControlLoop(self._ctx, self._housekeeping, self._on_unmatched)
        self._ctl.start()
        if self.config.channel in ("auto", "nixl"):
            try:
                from lmcache_disagg.transfer.nixl_agent import NixlAgent

                agent = NixlAgent(
                    f"lmcd-tx-{secrets.token_hex(6)}",
                    self.config.nixl_backends,
                    self.config.nixl_progress_thread,
                )
                agent.register(self.send_pool.pages)
                self._nixl = agent
            except Exception as exc:
                if self.config.channel == "nixl":
                    raise TransferError(f"channel nixl requested but NIXL failed: {exc}") from exc
                logger.info("NIXL unavailable (%s); pushing over TCP", exc)

    def shutdown(self) -> None:
        """Stop data threads, close sockets. Idempotent."""
        self._stop.set()
        with self._peers_lock:
            peers = set(self._peers.values()) | self._running
            self._peers.clear()
        for peer in peers:
            peer.close()
        if self._ctl is not None:
            self._ctl.stop()
            self._ctl = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
        if self._nixl is not None:
            self._nixl.close()
            self._nixl = None

    # -- API ------------------------------------------------------------------------------------

    def acquire_page(self, timeout: float) -> SendPage:
        """A free staging page (blocks up to ``timeout``; raises DeadlineExceeded)."""
        page = self.send_pool.acquire(timeout)
        self.metrics.pool_pages_used.inc()
        return page

    def release_page(self, page: SendPage) -> None:
        """Give back a page from :meth:`acquire_page` that will not be written. Idempotent."""
        self._release_page(page)

    def pages_in_use(self) -> int:
        """Staging pages acquired and not yet sent or released."""
        return self.send_pool.in_use()

    def _release_page(self, page: SendPage) -> None:
        self.send_pool.release(page)
        self.metrics.pool_pages_used.set(self.send_pool.in_use())

    def _release_pages(self, pages: list[SendPage]) -> None:
        self.metrics.pool_pages_used.set(self.send_pool.release_many(pages))

    def channel_for(self, target: str) -> str | None:
        """The channel of the cached session with ``target`` (None when not connected)."""
        with self._peers_lock:
            peer = self._peers.get(target)
        return peer.channel if peer else None

    def open(self, target: str, transfer_id: str, n_chunks: int) -> PushHandle:
        """Reserve ``n_chunks`` pages on ``target`` for ``transfer_id`` (one round trip).

        Retries while D's pool is full until ``reserve_timeout``. Raises PeerUnreachable,
        FingerprintMismatch, AuthenticationFailed, NoRoom, DeadlineExceeded, TargetNotAllowed,
        DuplicateTransfer.
        """
        if not self._started or self._stop.is_set():
            raise TransferError("KVSender is not running")
        if n_chunks <= 0:
            raise ValueError("n_chunks must be >= 1")
        try:
            self._check_target(target)
            return self._open(target, transfer_id, n_chunks)
        except TransferError as exc:
            self.metrics.failure(exc.reason)
            raise

    def _check_target(self, target: str) -> None:
        host, _port = split_target(target)
        allowlist = self.config.push_allowlist
        allowed = target in allowlist if allowlist else is_loopback(host)
        if not allowed and self.config.cluster_secret is None:
            raise TargetNotAllowed(
                f"push target {target} is not in push_allowlist "
                f"({'loopback only' if not allowlist else ', '.join(allowlist)}) and no "
                "cluster_secret is set to authenticate it"
            )

    def _open(self, target: str, transfer_id: str, n_chunks: int) -> PushHandle:
        started = time.monotonic()
        deadline = math.inf
        backoff = 0.002
        retried_session = False
        ttl = self.config.reservation_ttl
        while True:
            peer = self._peer(target)
            if deadline == math.inf:
                # A first push to a target includes the handshake, which has its own deadlines
                # (connect_timeout + handshake_timeout); reserve_timeout covers the reservation.
                deadline = time.monotonic() + self.config.reserve_timeout
            remaining = deadline - time.monotonic()
            make_reserve = functools.partial(
                _make_reserve, session=peer.session, transfer_id=transfer_id, n=n_chunks, ttl=ttl
            )
            try:
                reply = peer.request(make_reserve, max(remaining, 0.001), "reserve")
            except DeadlineExceeded:
                peer.mark_broken("deadline", "reservation round trip timed out")
                raise
            if isinstance(reply, ReserveReply):
                break
            if isinstance(reply, ErrorReply):
                error = error_from_reply(reply)
                if isinstance(error, UnknownSession) and not retried_session:
                    retried_session = True
                    peer.mark_broken("session", reply.message)
                    continue
                if isinstance(error, NoRoom) and time.monotonic() + backoff < deadline:
                    self.metrics.failure("reserve_retry")
                    time.sleep(backoff)
                    backoff = min(backoff * 2, 0.05)
                    continue
                raise error
            raise ProtocolViolation(f"unexpected reply to reserve: {type(reply).__name__}")
        if len(reply.pages) != n_chunks or any(
            not 0 <= page < peer.remote_pages for page in reply.pages
        ):
            raise ProtocolViolation("receiver returned a malformed reservation")
        self.metrics.reserve_wait_seconds.observe(time.monotonic() - started)
        handle = PushHandle(
            peer,
            transfer_id,
            reply.handle,
            list(reply.pages),
            n_chunks,
            time.monotonic() + self.config.push_deadline,
        )
        with peer.handles_lock:
            peer.handles.add(handle)
        return handle

    # -- peers ----------------------------------------------------------------------------------

    def _housekeeping(self) -> None:
        """Control thread, every HOUSEKEEPING_INTERVAL: fail pushes past their deadline."""
        with self._peers_lock:
            peers = set(self._peers.values()) | self._running
        for peer in peers:
            peer.check_deadlines()

    def _on_unmatched(self, peer: _Peer, reply: Reply) -> None:
        """A reply nobody waits for. A late reservation is handed straight back."""
        if isinstance(reply, ReserveReply) and not peer.closed:
            with contextlib.suppress(TransferError):
                peer.send_async(lambda rid: Cancel(rid, peer.session, reply.handle), None)

    def _thread_exited(self, peer: _Peer) -> None:
        with self._peers_lock:
            self._running.discard(peer)

    def _forget_peer(self, peer: _Peer) -> None:
        with self._peers_lock:
            if self._peers.get(peer.target) is peer:
                del self._peers[peer.target]

    def _peer(self, target: str) -> _Peer:
        with self._peers_lock:
            peer = self._peers.get(target)
        if peer is not None and not peer.broken:
            if peer.data_alive():
                return peer
            peer.mark_broken("peer_closed", "data connection closed by the receiver")
        with self._peers_lock:
            lock = self._connect_locks.setdefault(target, threading.Lock())
        timeout = self.config.connect_timeout + self.config.handshake_timeout
        if not lock.acquire(timeout=timeout):
            raise DeadlineExceeded(f"handshake with {target} still in progress")
        try:
            with self._peers_lock:
                peer = self._peers.get(target)
                if peer is not None and not peer.broken:
                    return peer
            peer = _Peer(self, target)
            try:
                self._handshake(peer)
            except BaseException:
                peer.close()
                raise
            with self._peers_lock:
                self._peers[target] = peer
                self._running.add(peer)
            peer.start()
            return peer
        finally:
            lock.release()

    def _handshake(self, peer: _Peer) -> None:
        config = self.config
        nonce = auth.make_nonce()
        nixl = self._nixl
        try:
            reply = peer.request(
                lambda rid: Hello(
                    rid,
                    PROTOCOL_VERSION,
                    self.fingerprint,
                    nonce,
                    want_nixl=nixl is not None,
                    nixl_agent=nixl.name if nixl else "",
                    nixl_metadata=nixl.metadata() if nixl else b"",
                ),
                config.connect_timeout + config.handshake_timeout,
                "handshake",
            )
        except DeadlineExceeded as exc:
            raise PeerUnreachable(
                f"KV receiver {peer.target} did not answer the handshake within "
                f"{config.connect_timeout + config.handshake_timeout:.3g}s"
            ) from exc
        if isinstance(reply, ErrorReply):
            _raise_error_reply(reply)
        if not isinstance(reply, HelloReply):
            raise ProtocolViolation(f"unexpected handshake reply {type(reply).__name__}")
        fields = self.fingerprint.diff(reply.fingerprint)
        if fields:
            raise FingerprintMismatch(f"receiver layout differs in {', '.join(fields)}", fields)
        if reply.page_bytes != self.fingerprint.page_bytes or reply.n_pages <= 0:
            raise ProtocolViolation("receiver announced an inconsistent pool")
        secret = config.cluster_secret
        if secret is not None:
            if not reply.auth_required or not auth.verify(
                secret, b"D", reply.proof, nonce, reply.nonce, self.fingerprint, reply.fingerprint
            ):
                raise AuthenticationFailed(
                    f"KV receiver {peer.target} failed to prove the cluster secret"
                )
            my_proof = auth.proof(
                secret, b"P", nonce, reply.nonce, self.fingerprint, reply.fingerprint
            )
            session = reply.session

            def make_auth(rid: int) -> Request:
                return Auth(rid, session, my_proof)

            auth_reply = peer.request(make_auth, config.handshake_timeout, "auth")
            if isinstance(auth_reply, ErrorReply):
                _raise_error_reply(auth_reply)
            if not isinstance(auth_reply, AuthReply) or not auth_reply.ok:
                raise AuthenticationFailed(f"KV receiver {peer.target} refused authentication")
        elif reply.auth_required:
            raise AuthenticationFailed(
                f"KV receiver {peer.target} requires the cluster secret; set cluster_secret "
                "(same value on P and D)"
            )
        peer.session = reply.session
        peer.remote_pages = reply.n_pages
        peer.channel = "tcp"
        if nixl is not None and reply.nixl_agent and reply.nixl_metadata:
            try:
                peer.nixl_remote = nixl.add_remote(reply.nixl_metadata)
                peer.pool_base = reply.pool_base
                peer.remote_mem = reply.nixl_mem
                peer.remote_dev = reply.nixl_dev
                peer.channel = "nixl"
            except Exception as exc:
                if config.channel == "nixl":
                    raise PeerUnreachable(f"NIXL handshake with {peer.target} failed") from exc
                logger.info("NIXL handshake with %s failed (%s); using TCP", peer.target, exc)
        elif config.channel == "nixl":
            raise PeerUnreachable(f"KV receiver {peer.target} offers no NIXL channel")
        if peer.channel == "tcp":
            if self.send_pool.view is None:
                raise TransferError(
                    "the TCP channel needs host staging pages (pool_device cpu or pinned)"
                )
            peer.data_sock = self._connect_data(peer, reply.data_port)
        logger.info("KV push path to %s: channel %s", peer.target, peer.channel)
        self.metrics.channel_selected(peer.channel)

    def _connect_data(self, peer: _Peer, port: int) -> socket.socket:
        if not 0 < port < 65536:
            raise ProtocolViolation(f"receiver announced data port {port}")
        try:
            sock = socket.create_connection((peer.host, port), timeout=self.config.connect_timeout)
        except OSError as exc:
            raise PeerUnreachable(f"cannot connect to {peer.host}:{port}: {exc}") from exc
        try:
            set_io_timeouts(sock)
            header = bytearray(FRAME_HEADER_SIZE)
            pack_header(header, FRAME_HELLO, 0, 0, 0, 0, 0, peer.session)
            send_all(sock, (header,), time.monotonic() + self.config.handshake_timeout, self._stop)
        except BaseException:
            sock.close()
            raise
        return sock
