"""D side: :class:`KVReceiver` accepts pushes from authenticated senders into its receive pool.

Threads (all named ``lmcd-rx-*``, stopped by one Event and joined in :meth:`KVReceiver.shutdown`):

* ``lmcd-rx-ctl``: the zmq ROUTER control plane (hello/auth/reserve/finish/cancel), NIXL
  notifications, and the TTL sweep.
* ``lmcd-rx-accept``: accepts TCP data connections; one ``lmcd-rx-conn-N`` thread per connection
  reads frames straight into reserved pages (at most :data:`MAX_DATA_CONNECTIONS`).

The connector's worker thread calls :meth:`poll`, :meth:`chunks` and :meth:`release`; those only take
the receiver lock briefly and never block on the network.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import msgspec
import xxhash
import zmq
from prometheus_client import CollectorRegistry

from lmcache_disagg.config import LMCacheDisaggConfig
from lmcache_disagg.netaddr import is_loopback
from lmcache_disagg.transfer import auth
from lmcache_disagg.transfer.errors import (
    AuthenticationFailed,
    DuplicateTransfer,
    FingerprintMismatch,
    NoRoom,
    PeerClosed,
    ProtocolViolation,
    TransferError,
    UnknownSession,
)
from lmcache_disagg.transfer.metrics import TransferMetrics
from lmcache_disagg.transfer.pool import ReceivePool
from lmcache_disagg.transfer.protocol import (
    CONTROL_MAX_MESSAGE,
    FRAME_CHUNK,
    FRAME_HEADER,
    FRAME_HEADER_SIZE,
    FRAME_HELLO,
    FRAME_MAGIC,
    FRAME_TRAILER,
    MAX_KEY_BYTES,
    MAX_TRANSFER_ID_LEN,
    NIXL_NOTIF,
    PROTOCOL_VERSION,
    Auth,
    AuthReply,
    Cancel,
    CancelReply,
    ErrorReply,
    Finish,
    FinishReply,
    Hello,
    HelloReply,
    LayoutFingerprint,
    Reply,
    Reserve,
    ReserveReply,
    decode_request,
    encode,
)
from lmcache_disagg.transfer.state import ReceivedChunk, RecvState, TransferState
from lmcache_disagg.transfer.tcp_channel import (
    Stopped,
    header_checksum,
    recv_exact,
    recv_exact_vec,
    set_io_timeouts,
    skip_bytes,
)
from lmcache_disagg.transfer.wakeup import Wakeup

if TYPE_CHECKING:
    from lmcache_disagg.transfer.nixl_agent import NixlAgent

__all__ = ["MAX_DATA_CONNECTIONS", "KVReceiver"]

logger = logging.getLogger(__name__)

MAX_DATA_CONNECTIONS = 256
MAX_SESSIONS = 1024
MAX_HALF_OPEN = 256
NIXL_QUARANTINE = 2.0
"""Seconds the pages of an unfinished NIXL transfer stay out of the pool after it ends."""
MAX_TOMBSTONES = 65536
_CTL_IDLE_POLL_MS = 50
_CTL_NIXL_POLL_MS = 1
_SWEEP_INTERVAL = 0.05
_DRAIN_BYTES = 1 << 20
_HASH_SLICE = 1 << 20


@dataclass(eq=False)
class _Session:
    sid: bytes
    authed: bool
    probe: bool
    p_nonce: bytes
    d_nonce: bytes
    p_fp: LayoutFingerprint | None
    nixl_agent: str = ""


@dataclass(eq=False)
class _RxTransfer:
    transfer_id: str
    handle: int
    session: _Session
    pages: list[int]
    slot_state: bytearray  # 0 empty, 1 being written, 2 verified
    meta: list[tuple[int, int, bytes] | None]
    expected: int | None = None
    received: int = 0
    state: RecvState = RecvState.RECEIVING
    reason: str = ""
    writers: int = 0
    ended: bool = False
    waiters: list[tuple[bytes, int]] = field(default_factory=list)


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


class KVReceiver:
    """Receives KV chunk pushes into a :class:`ReceivePool` (runs inside D's vLLM worker).

    Lifecycle: construct, :meth:`start` (binds; raises TransferError when it cannot), use,
    :meth:`shutdown` (idempotent). ``endpoint`` is the ``host:port`` P pushes to.
    """

    def __init__(
        self,
        config: LMCacheDisaggConfig,
        fingerprint: LayoutFingerprint,
        *,
        registry: CollectorRegistry | None = None,
    ) -> None:
        """Ports come from ``config``: ``listen_port`` (control), ``data_port`` (TCP data) and
        ``advertised_data_port``, announced to senders instead of the bound data port (port
        forwarding, NAT, or a test fault proxy in front of the real port)."""
        fingerprint.validate()
        self.config = config
        self.fingerprint = fingerprint
        self.page_bytes = fingerprint.page_bytes
        self.metrics = TransferMetrics("recv", registry)
        n_pages = max(1, config.pool_size // self.page_bytes)
        self.pool = ReceivePool(n_pages, self.page_bytes, config.pool_device)
        if self.pool.view is None and config.channel == "tcp":
            raise TransferError(
                "the TCP channel needs a host receive pool (pool_device cpu/pinned)"
            )
        self.metrics.pool_pages_total.set(n_pages)
        self.endpoint = ""
        self.channel_kind = "tcp"
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        # Authenticated sessions (LRU) apart from half-open ones (hello without auth yet, probes),
        # so a flood of hellos or health probes can never evict a working sender's session.
        self._sessions: collections.OrderedDict[bytes, _Session] = collections.OrderedDict()
        self._half_open: collections.OrderedDict[bytes, _Session] = collections.OrderedDict()
        self._nixl_sessions: dict[str, _Session] = {}
        self._by_id: dict[str, _RxTransfer] = {}
        self._by_handle: dict[int, _RxTransfer] = {}
        self._tombstones: collections.OrderedDict[str, str] = collections.OrderedDict()
        # handle -> (completed before it ended, reason): answers a Finish that arrives late.
        self._ended_handles: collections.OrderedDict[int, tuple[bool, str]] = (
            collections.OrderedDict()
        )
        self._handles = itertools.count(secrets.randbelow(1 << 30) + 1)
        self._resolved: collections.deque[_RxTransfer] = collections.deque()
        self._quarantine: collections.deque[tuple[float, _RxTransfer]] = collections.deque()
        self._threads: list[threading.Thread] = []
        self._conns: dict[socket.socket, threading.Thread] = {}
        self._conn_ids = itertools.count()
        self._ctx: zmq.Context[zmq.Socket[bytes]] | None = None
        self._router: zmq.Socket[bytes] | None = None
        self._listener: socket.socket | None = None
        self._wakeup: Wakeup | None = None
        self._nixl: NixlAgent | None = None
        self._started = False

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Bind the control and data sockets and start the threads. Called once."""
        if self._started:
            return
        self._started = True
        host = self.config.listen_host
        if not is_loopback(host) and not self.config.cluster_secret:
            logger.warning(
                "!!! KV receiver listening on non-loopback %s WITHOUT a cluster_secret: any host "
                "that can reach it may write KV into this worker. Set cluster_secret. !!!",
                host,
            )
        self._ctx = zmq.Context()
        router = self._ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.MAXMSGSIZE, CONTROL_MAX_MESSAGE)
        port = self.config.listen_port
        try:
            if port == 0:
                port = router.bind_to_random_port(f"tcp://{host}")
            else:
                router.bind(f"tcp://{host}:{port}")
        except zmq.ZMQError as exc:
            router.close(0)
            self._ctx.term()
            raise TransferError(f"cannot bind KV listener on {host}:{port}: {exc}") from exc
        self._router = router
        self.endpoint = f"{host}:{port}"
        try:
            self._listener = socket.create_server((host, self.config.data_port), backlog=64)
        except OSError as exc:
            self.shutdown()
            raise TransferError(
                f"cannot bind KV data listener on {host}:{self.config.data_port}: {exc}"
            ) from exc
        self._listener.settimeout(0.25)
        self._wakeup = Wakeup()
        if self.config.channel in ("auto", "nixl"):
            self._nixl = self._try_nixl()
        if self._nixl is None and self.pool.view is None:
            self.shutdown()
            raise TransferError(
                "NIXL is unavailable and the TCP fallback needs a host receive pool "
                "(pool_device cpu or pinned)"
            )
        self.channel_kind = "nixl" if self._nixl is not None else "tcp"
        self.metrics.channel_selected(self.channel_kind)
        logger.info(
            "KV receiver on %s (data port %d, channel %s, %d pages of %d bytes)",
            self.endpoint,
            self._listener.getsockname()[1],
            self.channel_kind,
            self.pool.n_pages,
            self.page_bytes,
        )
        for name, target in (("lmcd-rx-ctl", self._ctl_loop), ("lmcd-rx-accept", self._accept)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def _try_nixl(self) -> NixlAgent | None:
        try:
            from lmcache_disagg.transfer.nixl_agent import NixlAgent

            agent = NixlAgent(
                f"lmcd-rx-{secrets.token_hex(6)}",
                self.config.nixl_backends,
                self.config.nixl_progress_thread,
            )
            agent.register(self.pool.pages)
            return agent
        except Exception as exc:
            if self.config.channel == "nixl":
                raise TransferError(f"channel nixl requested but NIXL failed: {exc}") from exc
            logger.info("NIXL unavailable (%s); receiving over TCP only", exc)
            return None

    def shutdown(self) -> None:
        """Stop threads, close sockets. Idempotent; pages are not freed (the process is ending)."""
        self._stop.set()
        self._wake()
        with self._lock:
            conns = list(self._conns)
        for sock in conns:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(timeout=5)
        with self._lock:
            conn_threads = list(self._conns.values())
        for thread in conn_threads:
            thread.join(timeout=5)
        if self._listener is not None:
            self._listener.close()
        if self._wakeup is not None:
            self._wakeup.close()
        if self._router is not None:
            self._router.close(0)
            self._router = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
        if self._nixl is not None:
            self._nixl.close()
            self._nixl = None

    # -- connector API --------------------------------------------------------------------------

    def poll(self, transfer_id: str) -> TransferState:
        """Non-blocking snapshot of a transfer (UNKNOWN when never seen or already released)."""
        with self._lock:
            t = self._by_id.get(transfer_id)
            if t is not None:
                expected = t.expected if t.expected is not None else len(t.pages)
                return TransferState(t.state, t.received, expected, t.reason)
            reason = self._tombstones.get(transfer_id)
        if reason is None or reason == "released":
            return TransferState(RecvState.UNKNOWN)
        return TransferState(RecvState.FAILED, reason=reason)

    def wait(self, transfer_id: str, timeout: float) -> TransferState:
        """Block until the transfer is COMPLETE/FAILED (or ``timeout``); returns :meth:`poll`.

        For callers with a thread to spare (tests, the bench); the connector uses :meth:`poll`.
        """
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                t = self._by_id.get(transfer_id)
                if t is not None and t.state is not RecvState.RECEIVING:
                    break
                if t is None and transfer_id in self._tombstones:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._changed.wait(remaining)
        return self.poll(transfer_id)

    def chunks(self, transfer_id: str) -> list[ReceivedChunk]:
        """The verified chunks of a COMPLETE transfer, in index order (views into the pool)."""
        with self._lock:
            t = self._by_id.get(transfer_id)
            if t is None or t.state is not RecvState.COMPLETE:
                state = "unknown" if t is None else t.state.value
                raise TransferError(f"transfer {transfer_id!r} is not complete ({state})")
            out = []
            for slot in range(t.expected or 0):
                meta = t.meta[slot]
                assert meta is not None
                nbytes, num_tokens, key = meta
                page = self.pool.pages[t.pages[slot]]
                out.append(ReceivedChunk(slot, num_tokens, key, page[:nbytes]))
            return out

    def release(self, transfer_id: str) -> None:
        """Free the transfer's pages. Idempotent; the connector calls it after scattering."""
        with self._lock:
            t = self._by_id.get(transfer_id)
            if t is not None:
                self._end_locked(t, "released", "released")

    def occupancy(self) -> int:
        return self.pool.occupancy()

    @property
    def n_pages(self) -> int:
        """Pages in the receive pool."""
        return self.pool.n_pages

    def extend(self, transfer_id: str, ttl: float) -> None:
        """Restart the TTL of a held transfer at ``ttl`` seconds (no-op when not held)."""
        self.pool.extend(transfer_id, ttl)

    @property
    def data_port(self) -> int:
        """The TCP data port actually bound (0 before start)."""
        return self._listener.getsockname()[1] if self._listener is not None else 0

    # -- transfer bookkeeping (callers hold self._lock) -----------------------------------------

    def _end_locked(self, t: _RxTransfer, tombstone: str, fail_reason: str) -> None:
        if t.state is RecvState.RECEIVING:
            self._fail_locked(t, fail_reason)
        t.ended = True
        self._by_id.pop(t.transfer_id, None)
        self._by_handle.pop(t.handle, None)
        self._tombstones[t.transfer_id] = tombstone
        self._ended_handles[t.handle] = (t.state is RecvState.COMPLETE, t.reason or tombstone)
        while len(self._tombstones) > MAX_TOMBSTONES:
            self._tombstones.popitem(last=False)
        while len(self._ended_handles) > MAX_TOMBSTONES:
            self._ended_handles.popitem(last=False)
        if t.session.nixl_agent and t.state is not RecvState.COMPLETE:
            # A NIXL WRITE may still be in flight for an unfinished transfer (D cannot fence
            # remote writes): keep its pages out of circulation for a grace period so a late
            # write can never land in another transfer's page.
            t.writers += 1
            self._quarantine.append((time.monotonic() + NIXL_QUARANTINE, t))
        if t.writers == 0:
            self.pool.release(t.transfer_id)
            self.metrics.pool_pages_used.set(self.pool.occupancy())

    def _fail_locked(self, t: _RxTransfer, reason: str) -> None:
        if t.state is not RecvState.RECEIVING:
            return
        t.state = RecvState.FAILED
        t.reason = reason
        self.metrics.failure(reason)
        self.metrics.transfer_outcome("failed")
        self._resolve_locked(t)

    def _resolve_locked(self, t: _RxTransfer) -> None:
        self._changed.notify_all()
        if t.waiters:
            self._resolved.append(t)
            self._wake()

    def _check_complete_locked(self, t: _RxTransfer) -> None:
        expected = t.expected if t.expected is not None else len(t.pages)
        if t.state is not RecvState.RECEIVING or t.received < expected:
            return
        if t.slot_state[:expected].count(2) != expected:
            return
        t.expected = expected
        t.state = RecvState.COMPLETE
        self.pool.extend(t.transfer_id, self.config.reservation_ttl)
        self.metrics.transfer_outcome("complete")
        self._resolve_locked(t)

    def _begin_chunk(
        self, session: _Session, handle: int, slot: int, index: int, nbytes: int, num_tokens: int
    ) -> _RxTransfer | str:
        """Validate a chunk's addressing. Returns the transfer (slot marked in progress) or a
        reason string for a frame to drain and ignore; raises ProtocolViolation when the peer
        can no longer be trusted."""
        if not 0 < nbytes <= self.page_bytes:
            raise ProtocolViolation(f"chunk of {nbytes} bytes; pages hold {self.page_bytes}")
        if not 0 < num_tokens <= self.fingerprint.chunk_size:
            raise ProtocolViolation(f"chunk claims {num_tokens} tokens")
        with self._lock:
            t = self._by_handle.get(handle)
            if t is None:
                if handle in self._ended_handles:
                    return "write_after_release"
                raise ProtocolViolation(f"unknown transfer handle {handle}")
            if t.session is not session:
                raise ProtocolViolation("frame for a transfer reserved by another session")
            if slot != index or not 0 <= slot < len(t.pages):
                raise ProtocolViolation(
                    f"slot {slot}/index {index} outside the reservation of {len(t.pages)} pages"
                )
            if t.state is not RecvState.RECEIVING:
                return "write_after_" + t.state.value.lower()
            if t.slot_state[slot] != 0:
                return "duplicate_chunk"
            if t.expected is not None and index >= t.expected:
                return "chunk_after_finish"
            t.slot_state[slot] = 1
            t.writers += 1
            return t

    def _end_chunk(
        self, t: _RxTransfer, slot: int, nbytes: int, num_tokens: int, key: bytes, error: str
    ) -> None:
        """Commit (error == "") or fail a chunk begun with :meth:`_begin_chunk`."""
        with self._lock:
            t.writers -= 1
            if error:
                t.slot_state[slot] = 0
                self._fail_locked(t, error)
            elif t.state is RecvState.RECEIVING:
                t.slot_state[slot] = 2
                t.meta[slot] = (nbytes, num_tokens, key)
                t.received += 1
                self.metrics.chunks_total.inc()
                self.metrics.bytes_total.inc(nbytes)
                self._check_complete_locked(t)
            if t.ended and t.writers == 0:
                self.pool.release(t.transfer_id)
                self.metrics.pool_pages_used.set(self.pool.occupancy())

    # -- control plane --------------------------------------------------------------------------

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.wake()

    def _ctl_loop(self) -> None:
        router = self._router
        wakeup = self._wakeup
        assert router is not None and wakeup is not None
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(wakeup.fileno(), zmq.POLLIN)
        next_sweep = 0.0
        while not self._stop.is_set():
            timeout = _CTL_NIXL_POLL_MS if self._nixl_sessions else _CTL_IDLE_POLL_MS
            try:
                events = dict(poller.poll(timeout))
            except zmq.ZMQError:
                if self._stop.is_set():
                    return
                raise
            if wakeup.fileno() in events:
                wakeup.drain()
            if router in events:
                for _ in range(256):
                    try:
                        frames = router.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._on_control(router, frames)
            if self._nixl is not None and self._nixl_sessions:
                self._on_nixl_notifs()
            self._send_resolved(router)
            now = time.monotonic()
            if now >= next_sweep:
                next_sweep = now + _SWEEP_INTERVAL
                self._sweep(now)

    def _sweep(self, now: float) -> None:
        with self._lock:
            while self._quarantine and self._quarantine[0][0] <= now:
                _, held = self._quarantine.popleft()
                held.writers -= 1
                if held.writers == 0:
                    self.pool.release(held.transfer_id)
        for transfer_id in self.pool.expired(now):
            with self._lock:
                t = self._by_id.get(transfer_id)
                if t is not None:
                    if t.state is RecvState.COMPLETE:
                        self.metrics.failure("ttl_expired_unclaimed")
                    self._end_locked(t, "ttl_expired", "ttl_expired")
                    logger.info("reservation %s expired after its TTL", transfer_id)
        self.metrics.pool_pages_used.set(self.pool.occupancy())

    def _send_resolved(self, router: zmq.Socket[bytes]) -> None:
        while self._resolved:
            t = self._resolved.popleft()
            with self._lock:
                waiters, t.waiters = t.waiters, []
                state, reason = t.state, t.reason
            for ident, rid in waiters:
                self._reply(router, ident, FinishReply(rid, state.value, reason))

    def _reply(self, router: zmq.Socket[bytes], ident: bytes, reply: Reply) -> None:
        try:
            router.send_multipart([ident, encode(reply)], zmq.NOBLOCK)
        except zmq.ZMQError:
            self.metrics.failure("reply_dropped")

    def _on_control(self, router: zmq.Socket[bytes], frames: list[bytes]) -> None:
        if len(frames) != 2:
            self.metrics.failure("protocol")
            return
        ident, payload = frames
        try:
            request = decode_request(payload)
        except (msgspec.DecodeError, msgspec.ValidationError):
            self.metrics.failure("protocol")
            return
        try:
            match request:
                case Hello():
                    reply: Reply = self._on_hello(request)
                case Auth():
                    reply = self._on_auth(request)
                case Reserve():
                    reply = self._on_reserve(request)
                case Finish():
                    maybe = self._on_finish(request, ident)
                    if maybe is None:
                        return
                    reply = maybe
                case Cancel():
                    reply = self._on_cancel(request)
        except TransferError as exc:
            self.metrics.failure(exc.reason)
            fields = exc.fields if isinstance(exc, FingerprintMismatch) else []
            reply = ErrorReply(request.rid, exc.kind, str(exc), list(fields))
        except Exception as exc:  # a bug must not kill the control thread
            logger.exception("control request %s failed", type(request).__name__)
            self.metrics.failure("internal")
            reply = ErrorReply(request.rid, "error", f"internal error: {exc}")
        self._reply(router, ident, reply)

    def _session(self, sid: bytes, *, for_data: bool = True) -> _Session:
        with self._lock:
            session = self._sessions.get(sid)
            if session is not None:
                self._sessions.move_to_end(sid)
            elif sid in self._half_open:
                raise AuthenticationFailed("session is not authenticated")
        if session is None:
            raise UnknownSession("unknown session (the receiver restarted?); handshake again")
        if for_data and session.probe:
            raise ProtocolViolation("probe sessions cannot reserve")
        return session

    def _on_hello(self, hello: Hello) -> HelloReply:
        if hello.version != PROTOCOL_VERSION:
            raise ProtocolViolation(
                f"protocol version {hello.version} != {PROTOCOL_VERSION}; upgrade both sides"
            )
        if len(hello.nonce) != auth.NONCE_BYTES or len(hello.nixl_agent) > 256:
            raise ProtocolViolation("malformed hello")
        if hello.fingerprint is None:
            if not hello.probe:
                raise ProtocolViolation("hello without a fingerprint")
        else:
            try:
                hello.fingerprint.validate()
            except ValueError as exc:
                raise ProtocolViolation(str(exc)) from exc
            fields = hello.fingerprint.diff(self.fingerprint)
            if fields:
                detail = ", ".join(
                    f"{name}: sender {getattr(hello.fingerprint, name)!r} != receiver "
                    f"{getattr(self.fingerprint, name)!r}"
                    for name in fields
                )
                raise FingerprintMismatch(
                    f"KV layout fingerprint mismatch ({detail}); P and D must serve the same "
                    "model, dtype, chunk_size and TP layout",
                    fields,
                )
        secret = self.config.cluster_secret
        d_nonce = auth.make_nonce()
        session = _Session(
            sid=secrets.token_bytes(16),
            authed=secret is None,
            probe=hello.probe,
            p_nonce=hello.nonce,
            d_nonce=d_nonce,
            p_fp=hello.fingerprint,
        )
        proof = b""
        if secret is not None:
            proof = auth.proof(
                secret, b"D", hello.nonce, d_nonce, hello.fingerprint, self.fingerprint
            )
        use_nixl = self._nixl is not None and hello.want_nixl and bool(hello.nixl_agent)
        if use_nixl and self._nixl is not None and hello.nixl_metadata:
            try:
                self._nixl.add_remote(hello.nixl_metadata)
            except Exception as exc:
                logger.info("cannot load sender's NIXL metadata (%s); offering TCP only", exc)
                use_nixl = False
        if use_nixl:
            session.nixl_agent = hello.nixl_agent
        with self._lock:
            if session.authed and not session.probe:
                self._add_session_locked(session)
            elif not session.authed:
                self._half_open[session.sid] = session
                while len(self._half_open) > MAX_HALF_OPEN:
                    self._half_open.popitem(last=False)
        assert self._listener is not None
        nixl = self._nixl if use_nixl else None
        return HelloReply(
            rid=hello.rid,
            version=PROTOCOL_VERSION,
            fingerprint=self.fingerprint,
            nonce=d_nonce,
            proof=proof,
            auth_required=secret is not None,
            session=session.sid,
            data_port=self.config.advertised_data_port or self._listener.getsockname()[1],
            page_bytes=self.page_bytes,
            n_pages=self.pool.n_pages,
            nixl_agent=nixl.name if nixl else "",
            nixl_metadata=nixl.metadata() if nixl else b"",
            pool_base=nixl.base_address if nixl else 0,
            nixl_mem=nixl.mem_type if nixl else "DRAM",
            nixl_dev=nixl.device_id if nixl else 0,
        )

    def _add_session_locked(self, session: _Session) -> None:
        self._sessions[session.sid] = session
        if session.nixl_agent:
            self._nixl_sessions[session.nixl_agent] = session
        while len(self._sessions) > MAX_SESSIONS:
            _, old = self._sessions.popitem(last=False)
            if old.nixl_agent and self._nixl_sessions.get(old.nixl_agent) is old:
                del self._nixl_sessions[old.nixl_agent]

    def _on_auth(self, request: Auth) -> AuthReply:
        secret = self.config.cluster_secret
        if secret is None:
            return AuthReply(request.rid, True)
        with self._lock:
            session = self._half_open.pop(request.session, None)
        if session is None:
            raise UnknownSession("unknown session")
        ok = auth.verify(
            secret,
            b"P",
            request.proof,
            session.p_nonce,
            session.d_nonce,
            session.p_fp,
            self.fingerprint,
        )
        if not ok:
            logger.warning("KV sender failed HMAC authentication; session refused")
            raise AuthenticationFailed("HMAC proof did not verify: wrong or missing cluster_secret")
        session.authed = True
        if not session.probe:
            with self._lock:
                self._add_session_locked(session)
        return AuthReply(request.rid, True)

    def _on_reserve(self, request: Reserve) -> ReserveReply:
        session = self._session(request.session)
        if not request.transfer_id or len(request.transfer_id) > MAX_TRANSFER_ID_LEN:
            raise ProtocolViolation("transfer id empty or too long")
        if not 0 < request.n_pages <= self.pool.n_pages:
            raise NoRoom(
                f"{request.n_pages} pages requested; the pool has {self.pool.n_pages} in total"
            )
        if not request.ttl > 0:
            raise ProtocolViolation(f"bad ttl {request.ttl}")
        ttl = min(request.ttl, self.config.reservation_ttl)
        with self._lock:
            if request.transfer_id in self._by_id or request.transfer_id in self._tombstones:
                raise DuplicateTransfer(f"transfer id {request.transfer_id!r} was already used")
            pages = self.pool.reserve(request.transfer_id, request.n_pages, ttl)
            handle = next(self._handles)
            t = _RxTransfer(
                transfer_id=request.transfer_id,
                handle=handle,
                session=session,
                pages=pages,
                slot_state=bytearray(len(pages)),
                meta=[None] * len(pages),
            )
            self._by_id[t.transfer_id] = t
            self._by_handle[handle] = t
        self.metrics.pool_pages_used.set(self.pool.occupancy())
        return ReserveReply(request.rid, handle, pages)

    def _on_finish(self, request: Finish, ident: bytes) -> FinishReply | None:
        session = self._session(request.session)
        with self._lock:
            t = self._by_handle.get(request.handle)
            if t is None:
                # Already released: fine if it had completed (D consumed it before our finish).
                complete, reason = self._ended_handles.get(request.handle, (False, "unknown"))
                if complete:
                    return FinishReply(request.rid, RecvState.COMPLETE.value)
                return FinishReply(request.rid, RecvState.FAILED.value, reason)
            if t.session is not session:
                raise ProtocolViolation("finish for a transfer of another session")
            if not 0 < request.n_chunks <= len(t.pages):
                raise ProtocolViolation(f"finish with {request.n_chunks} chunks")
            if t.state is RecvState.RECEIVING:
                if t.expected is None:
                    t.expected = request.n_chunks
                self._check_complete_locked(t)
            if t.state is RecvState.RECEIVING:
                t.waiters.append((ident, request.rid))
                return None
            return FinishReply(request.rid, t.state.value, t.reason)

    def _on_cancel(self, request: Cancel) -> CancelReply:
        session = self._session(request.session)
        with self._lock:
            t = self._by_handle.get(request.handle)
            # A complete transfer belongs to D's connector now (it may be copying out of the
            # pages): only its release or the TTL frees it.
            if t is not None and t.session is session and t.state is not RecvState.COMPLETE:
                # P cancels a transfer it learnt had FAILED (checksum, truncated): keep that
                # cause for D's connector, which counts its fallback by it.
                failed = t.state is RecvState.FAILED and t.reason
                self._end_locked(t, t.reason if failed else "cancelled", "cancelled")
        return CancelReply(request.rid)

    # -- NIXL notifications -----------------------------------------------------------------------

    def _on_nixl_notifs(self) -> None:
        assert self._nixl is not None
        for agent_name, messages in self._nixl.get_new_notifs().items():
            with self._lock:
                session = self._nixl_sessions.get(agent_name)
            for message in messages:
                if session is None or not session.authed:
                    self.metrics.failure("auth")
                    continue
                try:
                    self._on_nixl_notif(session, message)
                except ProtocolViolation as exc:
                    logger.warning("bad NIXL notification from %s: %s", agent_name, exc)
                    self.metrics.failure("protocol")

    def _on_nixl_notif(self, session: _Session, message: bytes) -> None:
        if len(message) < NIXL_NOTIF.size:
            raise ProtocolViolation("short notification")
        tag, handle, slot, index, nbytes, num_tokens, key_len = NIXL_NOTIF.unpack_from(message)
        if tag != b"K" or key_len > MAX_KEY_BYTES or len(message) != NIXL_NOTIF.size + key_len:
            raise ProtocolViolation("malformed notification")
        key = bytes(message[NIXL_NOTIF.size :])
        begun = self._begin_chunk(session, handle, slot, index, nbytes, num_tokens)
        if isinstance(begun, str):
            self.metrics.failure(begun)
            return
        self._end_chunk(begun, slot, nbytes, num_tokens, key, "")

    # -- TCP data connections ---------------------------------------------------------------------

    def _accept(self) -> None:
        listener = self._listener
        assert listener is not None
        while not self._stop.is_set():
            try:
                sock, _addr = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                time.sleep(0.05)
                continue
            with self._lock:
                if len(self._conns) >= MAX_DATA_CONNECTIONS:
                    self.metrics.failure("too_many_connections")
                    sock.close()
                    continue
                thread = threading.Thread(
                    target=self._serve_conn,
                    args=(sock,),
                    name=f"lmcd-rx-conn-{next(self._conn_ids)}",
                    daemon=True,
                )
                self._conns[sock] = thread
            thread.start()

    def _serve_conn(self, sock: socket.socket) -> None:
        try:
            set_io_timeouts(sock)
            self._read_frames(sock)
        except Stopped:
            pass
        except ProtocolViolation as exc:
            logger.warning("closing KV data connection: %s", exc)
            self.metrics.failure("protocol")
        except PeerClosed as exc:
            logger.debug("KV data connection closed: %s", exc)
        except Exception:
            logger.exception("KV data connection failed")
            self.metrics.failure("internal")
        finally:
            sock.close()
            with self._lock:
                self._conns.pop(sock, None)

    def _read_frames(self, sock: socket.socket) -> None:
        stop = self._stop
        stall = self.config.handshake_timeout
        header = bytearray(FRAME_HEADER_SIZE)
        hview = memoryview(header)
        unpack = FRAME_HEADER.unpack_from
        pool_view = self.pool.view
        assert pool_view is not None
        page_bytes = self.page_bytes
        if not recv_exact(sock, hview, stop, idle_ok=False, stall_timeout=stall):
            return
        magic, version, kind, _f, _h, _s, _i, nbytes, _n, key_len, _r, checksum, keyf = unpack(
            header
        )
        if magic != FRAME_MAGIC or version != PROTOCOL_VERSION or kind != FRAME_HELLO:
            raise ProtocolViolation("data connection did not start with a hello frame")
        if nbytes != 0 or key_len != 16 or header_checksum(header, keyf[:16]) != checksum:
            raise ProtocolViolation("malformed data hello")
        try:
            session = self._session(bytes(keyf[:16]))
        except (ProtocolViolation, AuthenticationFailed):
            self.metrics.failure("auth")
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
                slot,
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
            begun = self._begin_chunk(session, handle, slot, index, nbytes, num_tokens)
            if isinstance(begun, str):
                self.metrics.failure(begun)
                remaining = nbytes + FRAME_TRAILER.size
                while remaining:
                    step = min(remaining, _DRAIN_BYTES)
                    recv_exact(sock, scratch[:step], stop, idle_ok=False, stall_timeout=stall)
                    remaining -= step
                continue
            start = begun.pages[slot] * page_bytes
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
                self._end_chunk(begun, slot, nbytes, num_tokens, key, error)
            if error:
                logger.warning(
                    "chunk %d of transfer %s failed: %s", index, begun.transfer_id, error
                )
            if have_header:
                header, spare = spare, header
                hview, sview = sview, hview
