"""P side: :class:`KVSender` pushes chunk pages into a receiver's reserved pool pages.

Threads: one ``lmcd-tx-<host:port>`` data thread per connected receiver runs that peer's channel
link pump (:mod:`.channels`) over the peer's bounded write queue, so :meth:`PushHandle.write`
returns at once and the send overlaps the caller's compute. One ``lmcd-tx-ctl`` thread
(:mod:`.control`) owns the zmq control sockets: callers' requests (hello, reserve) wait on it with
their deadline, finish notices and cancels are fire-and-forget, and it fails pushes that pass their
deadline even when nobody polls them.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Sequence

import zmq
from prometheus_client import CollectorRegistry

from lmcache_disagg.config import ConfigError, LMCacheDisaggConfig, split_host_port
from lmcache_disagg.netaddr import is_loopback
from lmcache_disagg.transfer import auth
from lmcache_disagg.transfer.channels.base import (
    STOP,
    ChunkItem,
    FinishItem,
    SendChannel,
    SendItem,
    SendLink,
)
from lmcache_disagg.transfer.channels.frames import Stopped
from lmcache_disagg.transfer.channels.select import send_channels
from lmcache_disagg.transfer.control import ControlLoop
from lmcache_disagg.transfer.errors import (
    AuthenticationFailed,
    DeadlineExceeded,
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
    MAX_KEY_BYTES,
    PROTOCOL_VERSION,
    Auth,
    AuthReply,
    Cancel,
    ChannelOffer,
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
from lmcache_disagg.transfer.session import check_hello_reply
from lmcache_disagg.transfer.state import PushState, PushStatus

__all__ = ["KVSender", "PushHandle"]

logger = logging.getLogger(__name__)


def error_from_reply(reply: ErrorReply) -> TransferError:
    return error_from_kind(reply.kind, reply.message, reply.fields)


def _raise_error_reply(reply: ErrorReply) -> None:
    raise error_from_reply(reply)


def _make_reserve(
    rid: int, *, session: bytes, transfer_id: str, n: int, ttl: float, keys: list[bytes]
) -> Request:
    return Reserve(rid, session, transfer_id, n, ttl, keys)


def split_target(target: str) -> tuple[str, int]:
    try:
        return split_host_port(target)
    except ConfigError:
        raise TargetNotAllowed(f"push target {target!r} is not host:port") from None


class _Peer:
    """One receiver: its control socket, session, data link and data thread."""

    def __init__(self, sender: KVSender, ctl: ControlLoop, target: str) -> None:
        self.sender = sender
        self.target = target
        self.host, self.port = split_target(target)
        self.ctl = ctl
        self.ctl.connect(self, f"tcp://{self.host}:{self.port}")
        self.rids = itertools.count(1)
        self.session = b""
        self.link: SendLink | None = None
        self.remote_pages = 0
        # SimpleQueue (C, ~0.3 us per put+get against ~2.3 us for queue.Queue) is on the path of
        # every chunk. It is bounded here, in enqueue(): chunk items each hold a staging page
        # (at most n_pages of them), so only finish notices can pile up past that.
        self.queue: queue.SimpleQueue[SendItem] = queue.SimpleQueue()
        self.max_queued = sender.send_pool.n_pages * 2 + 64
        self.thread: threading.Thread | None = None
        self.broken = ""
        self.closed = False
        self.handles: set[PushHandle] = set()
        self.handles_lock = threading.Lock()

    @property
    def channel(self) -> str:
        return self.link.name if self.link is not None else ""

    @property
    def metrics(self) -> TransferMetrics:
        return self.sender.metrics

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
                self.sender.on_unmatched(self, reply)

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

    # -- data thread (the link's pump; see channels.base.PumpHost) -------------------------------

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name=f"lmcd-tx-{self.target}", daemon=True)
        self.thread.start()

    def enqueue(self, item: SendItem, deadline: float) -> None:
        while self.queue.qsize() >= self.max_queued:
            # Only a stalled data thread gets here (see max_queued); wait for it to catch up.
            if time.monotonic() >= deadline:
                raise DeadlineExceeded(f"send queue to {self.target} full until the deadline")
            time.sleep(0.001)
        self.queue.put(item)

    def _run(self) -> None:
        sender = self.sender
        link = self.link
        assert link is not None
        try:
            link.pump(self, sender.stopping)
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
            self.sender.thread_exited(self)

    def next_item(self, timeout: float) -> SendItem | None:
        if self.broken:
            return STOP
        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            if self.sender.stopping.is_set():
                return STOP
            return None

    def next_item_nowait(self) -> SendItem | None:
        try:
            return self.queue.get_nowait()
        except queue.Empty:
            return None

    def release_pages(self, pages: list[SendPage]) -> None:
        self.sender.release_pages(pages)

    def send_finish(self, handle: PushHandle) -> None:
        if handle.state is not PushState.PENDING:
            return
        self.send_async(
            lambda rid: Finish(rid, self.session, handle.handle, handle.n_written),
            handle.on_finish_reply,
        )

    def _drain_queue(self) -> None:
        while True:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, ChunkItem):
                self.sender.release_page(item.page)

    def check_deadlines(self) -> None:
        now = time.monotonic()
        with self.handles_lock:
            handles = list(self.handles)
        for handle in handles:
            if handle.state is PushState.PENDING and now > handle.deadline:
                handle.fail("deadline")
                handle.cancel_remote()

    def data_alive(self) -> bool:
        """False once the data path is known to be gone (cheap)."""
        if self.link is None:
            return not self.broken
        return self.link.alive()

    def mark_broken(self, reason: str, message: str) -> None:
        if not self.broken:
            logger.warning("KV push path to %s broken (%s): %s", self.target, reason, message)
        self.sender.forget_peer(self)
        with self.handles_lock:
            handles = list(self.handles)
        for handle in handles:
            handle.fail(reason)
            # The control path may still work when only the data path broke: tell D now so
            # its connector sees FAILED at once and the pages free before the TTL.
            handle.cancel_remote()
        self.broken = reason
        if self.link is not None:
            self.link.interrupt()

    def close(self) -> None:
        """Stop the data thread (if any) and close the sockets. Called by the sender only."""
        if self.thread is not None:
            self.queue.put(STOP)
            self.thread.join(timeout=5)
        self._close_sockets()

    def _close_sockets(self) -> None:
        if self.link is not None:
            self.link.close()
        if not self.closed:
            self.closed = True
            self.ctl.close(self)


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
        held: int = 0,
    ) -> None:
        self._peer = peer
        self.transfer_id = transfer_id
        self.handle = handle
        self.pages = pages
        self.n_chunks = n_chunks
        self.deadline = deadline
        self.state = PushState.PENDING
        self.reason = ""
        self.held = held
        """Chunks ``[0, held)`` are already on D: they count as written and must not be sent."""
        self.n_written = held
        self._written = bytearray(n_chunks)
        self._written[:held] = b"\x01" * held
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
            sender.release_page(page)
            raise ValueError(f"chunk index {index} outside [0, {self.n_chunks})")
        if not 0 < nbytes <= sender.send_pool.page_bytes or len(key) > MAX_KEY_BYTES:
            sender.release_page(page)
            raise ValueError(f"bad chunk: {nbytes} bytes, key of {len(key)} bytes")
        if sender.send_pool.by_index.get(page.index) is not page:
            raise ValueError("page does not come from this sender's acquire_page()")
        if self._finished or self._cancelled:
            sender.release_page(page)
            raise TransferError(f"write after finish/cancel on transfer {self.transfer_id!r}")
        if self._written[index]:
            sender.release_page(page)
            raise ValueError(f"chunk {index} of {self.transfer_id!r} written twice")
        if self.state is not PushState.PENDING:
            sender.release_page(page)
            return
        self._written[index] = 1
        self.n_written += 1
        try:
            self._peer.enqueue(ChunkItem(self, index, page, nbytes, num_tokens, key), self.deadline)
        except DeadlineExceeded:
            sender.release_page(page)
            self.fail("deadline")

    def finish(self) -> None:
        """Mark the end of the writes: chunks [0, n_written) must all have been written."""
        if self._finished or self._cancelled:
            return
        self._finished = True
        if self.n_written == 0 or self._written[: self.n_written].count(1) != self.n_written:
            self.fail("incomplete")
            self.cancel_remote()
            raise ValueError(
                f"finish() needs chunks 0..n-1 written; got {self.n_written} non-contiguous chunks"
            )
        if self.state is PushState.PENDING:
            try:
                self._peer.enqueue(FinishItem(self), self.deadline)
            except DeadlineExceeded:
                self.fail("deadline")

    def cancel(self) -> None:
        """Abort: D drops the reservation. Idempotent, best effort, never raises."""
        if self._cancelled:
            return
        self._cancelled = True
        if self.state is PushState.DONE:
            return  # D owns a complete transfer now; its connector releases it
        self.fail("cancelled")
        self.cancel_remote()

    @property
    def pending(self) -> bool:
        return self.state is PushState.PENDING

    def status(self) -> PushStatus:
        """Non-blocking: PENDING, DONE (D verified every chunk) or FAILED(reason)."""
        if self.state is PushState.PENDING and time.monotonic() > self.deadline:
            self.fail("deadline")
            self.cancel_remote()
        return PushStatus(self.state, self.reason)

    def wait(self, timeout: float) -> PushStatus:
        """Block until DONE/FAILED or ``timeout`` seconds; returns :meth:`status`."""
        self._resolved.wait(max(0.0, min(timeout, self.deadline - time.monotonic() + 0.01)))
        return self.status()

    # -- internal -------------------------------------------------------------------------------

    def cancel_remote(self) -> None:
        """Ask D to drop the reservation (fire and forget; not after the path broke)."""
        peer = self._peer
        if peer.broken:
            return
        with contextlib.suppress(TransferError):
            peer.send_async(lambda rid: Cancel(rid, peer.session, self.handle), lambda _r: None)

    def fail(self, reason: str) -> None:
        """Resolve as FAILED(``reason``) unless already resolved. Any thread."""
        with self._lock:
            if self.state is not PushState.PENDING:
                return
            self.state = PushState.FAILED
            self.reason = reason
        self._resolved.set()
        self._peer.sender.metrics.failure(reason)
        self._peer.sender.metrics.transfer_outcome("failed")
        self._forget()

    def on_finish_reply(self, reply: Reply | None) -> None:
        """D's answer to the finish notice (control thread)."""
        if reply is None:
            self.fail("peer_closed")
        elif isinstance(reply, FinishReply) and reply.state == "COMPLETE":
            with self._lock:
                if self.state is not PushState.PENDING:
                    return
                self.state = PushState.DONE
            self._resolved.set()
            self._peer.sender.metrics.transfer_outcome("done")
            self._forget()
        elif isinstance(reply, FinishReply):
            self.fail(reply.reason or "receiver_failed")
        else:
            self.fail(reply.kind if isinstance(reply, ErrorReply) else "protocol")

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
        self.metrics.pool_pages_total.set(n_pages)
        self.stopping = threading.Event()
        """Set by :meth:`shutdown`; the data threads and channels stop on it."""
        self._peers: dict[str, _Peer] = {}
        self._running: set[_Peer] = set()
        self._peers_lock = threading.Lock()
        self._connect_locks: dict[str, threading.Lock] = {}
        self._ctx: zmq.Context[zmq.Socket[bytes]] | None = None
        self._ctl: ControlLoop | None = None
        self._channels: list[SendChannel] = []
        self._started = False

    def start(self) -> None:
        """Create the zmq context, the control thread and the channels (NIXL: its agent)."""
        if self._started:
            return
        self._started = True
        self._ctx = zmq.Context()
        self._ctl = ControlLoop(self._ctx, self._housekeeping, self.on_unmatched)
        self._ctl.start()
        self._channels = send_channels(
            self.config, self.send_pool, self.fingerprint.page_bytes, self.stopping
        )

    def shutdown(self) -> None:
        """Stop data threads, close sockets. Idempotent."""
        self.stopping.set()
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
        for channel in self._channels:
            channel.close()
        self._channels = []

    # -- API ------------------------------------------------------------------------------------

    def acquire_page(self, timeout: float) -> SendPage:
        """A free staging page (blocks up to ``timeout``; raises DeadlineExceeded)."""
        page = self.send_pool.acquire(timeout)
        self.metrics.pool_pages_used.inc()
        return page

    def release_page(self, page: SendPage) -> None:
        """Give back a page from :meth:`acquire_page` that will not be written. Idempotent."""
        self.send_pool.release(page)
        self.metrics.pool_pages_used.set(self.send_pool.in_use())

    def pages_in_use(self) -> int:
        """Staging pages acquired and not yet sent or released."""
        return self.send_pool.in_use()

    def release_pages(self, pages: list[SendPage]) -> None:
        """Give back several pages at once (the data threads, once sent)."""
        self.metrics.pool_pages_used.set(self.send_pool.release_many(pages))

    def channel_for(self, target: str) -> str | None:
        """The channel of the cached session with ``target`` (None when not connected)."""
        with self._peers_lock:
            peer = self._peers.get(target)
        return peer.channel if peer else None

    def open(
        self, target: str, transfer_id: str, n_chunks: int, keys: Sequence[bytes] = ()
    ) -> PushHandle:
        """Reserve ``n_chunks`` pages on ``target`` for ``transfer_id`` (one round trip).

        ``keys`` (one per chunk, or none): D answers which leading chunks it already holds;
        the handle's ``held`` says how many, and those are not written.

        Retries while D's pool is full until ``reserve_timeout``. Raises PeerUnreachable,
        FingerprintMismatch, AuthenticationFailed, NoRoom, DeadlineExceeded, TargetNotAllowed,
        DuplicateTransfer.
        """
        if not self._started or self.stopping.is_set():
            raise TransferError("KVSender is not running")
        if n_chunks <= 0:
            raise ValueError("n_chunks must be >= 1")
        if keys and len(keys) != n_chunks:
            raise ValueError(f"{len(keys)} keys for {n_chunks} chunks")
        try:
            self._check_target(target)
            return self._open(target, transfer_id, n_chunks, list(keys))
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

    def _open(self, target: str, transfer_id: str, n_chunks: int, keys: list[bytes]) -> PushHandle:
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
                _make_reserve,
                session=peer.session,
                transfer_id=transfer_id,
                n=n_chunks,
                ttl=ttl,
                keys=keys,
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
        if (
            len(reply.pages) != n_chunks
            or any(not 0 <= page < peer.remote_pages for page in reply.pages)
            or not 0 <= reply.held < n_chunks
            or (reply.held and not keys)
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
            reply.held,
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

    def on_unmatched(self, peer: _Peer, reply: Reply) -> None:
        """A reply nobody waits for. A late reservation is handed straight back."""
        if isinstance(reply, ReserveReply) and not peer.closed:
            with contextlib.suppress(TransferError):
                peer.send_async(lambda rid: Cancel(rid, peer.session, reply.handle), None)

    def thread_exited(self, peer: _Peer) -> None:
        with self._peers_lock:
            self._running.discard(peer)

    def forget_peer(self, peer: _Peer) -> None:
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
            assert self._ctl is not None
            peer = _Peer(self, self._ctl, target)
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
        offers = [ChannelOffer(channel.name, channel.offer()) for channel in self._channels]
        timeout = config.connect_timeout + config.handshake_timeout
        try:
            reply = peer.request(
                lambda rid: Hello(rid, PROTOCOL_VERSION, self.fingerprint, nonce, channels=offers),
                timeout,
                "handshake",
            )
        except DeadlineExceeded as exc:
            raise PeerUnreachable(
                f"KV receiver {peer.target} did not answer the handshake within {timeout:.3g}s"
            ) from exc
        if isinstance(reply, ErrorReply):
            _raise_error_reply(reply)
        if not isinstance(reply, HelloReply):
            raise ProtocolViolation(f"unexpected handshake reply {type(reply).__name__}")
        my_proof = check_hello_reply(
            reply, self.fingerprint, config.cluster_secret, nonce, peer.target
        )
        if my_proof is not None:
            session = reply.session

            def make_auth(rid: int) -> Request:
                return Auth(rid, session, my_proof)

            auth_reply = peer.request(make_auth, config.handshake_timeout, "auth")
            if isinstance(auth_reply, ErrorReply):
                _raise_error_reply(auth_reply)
            if not isinstance(auth_reply, AuthReply) or not auth_reply.ok:
                raise AuthenticationFailed(f"KV receiver {peer.target} refused authentication")
        peer.session = reply.session
        peer.remote_pages = reply.n_pages
        peer.link = self._connect_link(peer, reply)
        logger.info("KV push path to %s: channel %s", peer.target, peer.channel)
        self.metrics.channel_selected(peer.channel)

    def _connect_link(self, peer: _Peer, reply: HelloReply) -> SendLink:
        """The first of our channels (in preference order) that D accepted and that connects."""
        accepted = {offer.name: offer.params for offer in reply.channels}
        candidates = [channel for channel in self._channels if channel.name in accepted]
        if not candidates:
            names = "/".join(channel.name.upper() for channel in self._channels)
            raise PeerUnreachable(f"KV receiver {peer.target} offers no {names} channel")
        for n, channel in enumerate(candidates):
            try:
                return channel.connect(peer.host, peer.session, accepted[channel.name], peer.target)
            except TransferError as exc:
                if n == len(candidates) - 1:
                    raise
                logger.info(
                    "%s channel to %s failed (%s); trying %s",
                    channel.name,
                    peer.target,
                    exc,
                    candidates[n + 1].name,
                )
        raise AssertionError("unreachable")
