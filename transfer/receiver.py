"""D side: :class:`KVReceiver` accepts pushes from authenticated senders into its receive pool.

Threads (all named ``lmcd-rx-*``, stopped by one Event and joined in :meth:`KVReceiver.shutdown`):

* ``lmcd-rx-ctl``: the zmq ROUTER control plane (hello/auth/reserve/finish/cancel), the channels'
  :meth:`~.channels.base.ReceiveChannel.poll` (NIXL notifications), and the TTL sweep.
* the channels' own threads (the TCP channel's ``lmcd-rx-accept`` and ``lmcd-rx-conn-N``).

Channels report chunks through :meth:`KVReceiver.begin_chunk` / :meth:`KVReceiver.end_chunk`;
sessions and the handshake live in :mod:`.session`, transfers' pages and slots in
:mod:`.reservation`.

The connector's worker thread calls :meth:`poll`, :meth:`chunks` and :meth:`release`; those only take
the receiver lock briefly and never block on the network.
"""

from __future__ import annotations

import collections
import itertools
import logging
import secrets
import threading
import time
from collections.abc import Sequence
from typing import Protocol

import msgspec
import zmq
from prometheus_client import CollectorRegistry

from lmcache_disagg.config import LMCacheDisaggConfig
from lmcache_disagg.netaddr import is_loopback
from lmcache_disagg.transfer import session as sessions
from lmcache_disagg.transfer.channels.base import ReceiveChannel
from lmcache_disagg.transfer.channels.select import receive_channels
from lmcache_disagg.transfer.channels.tcp import MAX_DATA_CONNECTIONS
from lmcache_disagg.transfer.errors import (
    AuthenticationFailed,
    DuplicateTransfer,
    FingerprintMismatch,
    NoRoom,
    ProtocolViolation,
    TransferError,
)
from lmcache_disagg.transfer.metrics import TransferMetrics
from lmcache_disagg.transfer.pool import ReceivePool
from lmcache_disagg.transfer.protocol import (
    CONTROL_MAX_MESSAGE,
    MAX_KEY_BYTES,
    MAX_TRANSFER_ID_LEN,
    PROTOCOL_VERSION,
    Auth,
    AuthReply,
    Cancel,
    CancelReply,
    ChannelOffer,
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
from lmcache_disagg.transfer.reservation import ChunkMeta, ChunkTarget, Reservation, SlotState
from lmcache_disagg.transfer.session import Session, SessionTable
from lmcache_disagg.transfer.state import ReceivedChunk, RecvState, TransferState
from lmcache_disagg.transfer.wakeup import Wakeup

__all__ = ["MAX_DATA_CONNECTIONS", "ChunkTarget", "HeldChunks", "KVReceiver"]

logger = logging.getLogger(__name__)

NIXL_QUARANTINE = 2.0
"""Seconds the pages of an unfinished unfenced (NIXL) transfer stay out of the pool after it ends."""
MAX_TOMBSTONES = 65536
_CTL_IDLE_POLL_MS = 50
_CTL_BUSY_POLL_MS = 1
_SWEEP_INTERVAL = 0.05


class HeldChunks(Protocol):
    """D's own chunk store, seen by the receiver (given by the connector; any thread).

    ``held`` answers a reservation: how many LEADING ``keys`` D holds, pinned under a lease named
    by ``transfer_id`` (expiring on its own after ``ttl`` at the latest); ``drop`` releases that
    lease (idempotent) once the reservation ended.
    """

    def held(self, transfer_id: str, keys: Sequence[bytes], ttl: float) -> int: ...

    def drop(self, transfer_id: str) -> None: ...


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
        held: HeldChunks | None = None,
    ) -> None:
        """Ports come from ``config``: ``listen_port`` (control), ``data_port`` (TCP data) and
        ``advertised_data_port``, announced to senders instead of the bound data port (port
        forwarding, NAT, or a test fault proxy in front of the real port). ``held``: D's store,
        asked at each reservation which leading chunks need no push."""
        fingerprint.validate()
        self._held = held
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
        self.channel_kind = ""
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._sessions = SessionTable()
        self._channels: dict[str, ReceiveChannel] = {}
        self._by_id: dict[str, Reservation] = {}
        self._by_handle: dict[int, Reservation] = {}
        self._tombstones: collections.OrderedDict[str, str] = collections.OrderedDict()
        # handle -> (completed before it ended, reason): answers a Finish that arrives late.
        self._ended_handles: collections.OrderedDict[int, tuple[bool, str]] = (
            collections.OrderedDict()
        )
        self._handles = itertools.count(secrets.randbelow(1 << 30) + 1)
        self._resolved: collections.deque[Reservation] = collections.deque()
        self._quarantine: collections.deque[tuple[float, Reservation]] = collections.deque()
        self._threads: list[threading.Thread] = []
        self._ctx: zmq.Context[zmq.Socket[bytes]] | None = None
        self._router: zmq.Socket[bytes] | None = None
        self._wakeup: Wakeup | None = None
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
        self._wakeup = Wakeup()
        try:
            self._channels = {c.name: c for c in receive_channels(self.config, self.pool, host)}
        except BaseException:
            self.shutdown()
            raise
        if not self._channels:
            self.shutdown()
            raise TransferError(
                "NIXL is unavailable and the TCP fallback needs a host receive pool "
                "(pool_device cpu or pinned)"
            )
        # The most capable channel names the receiver's kind (metrics, logs).
        self.channel_kind = next(iter(self._channels))
        self.metrics.channel_selected(self.channel_kind)
        logger.info(
            "KV receiver on %s (data port %d, channels %s, %d pages of %d bytes)",
            self.endpoint,
            self.data_port,
            "+".join(self._channels),
            self.pool.n_pages,
            self.page_bytes,
        )
        for channel in self._channels.values():
            channel.start(self, self._stop)
        thread = threading.Thread(target=self._ctl_loop, name="lmcd-rx-ctl", daemon=True)
        thread.start()
        self._threads.append(thread)

    def shutdown(self) -> None:
        """Stop threads, close sockets. Idempotent; pages are not freed (the process is ending)."""
        self._stop.set()
        self._wake()
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads.clear()
        for channel in self._channels.values():
            channel.shutdown()
        self._channels = {}
        if self._wakeup is not None:
            self._wakeup.close()
            self._wakeup = None
        if self._router is not None:
            self._router.close(0)
            self._router = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    # -- connector API --------------------------------------------------------------------------

    def poll(self, transfer_id: str) -> TransferState:
        """Non-blocking snapshot of a transfer (UNKNOWN when never seen or already released)."""
        with self._lock:
            t = self._by_id.get(transfer_id)
            if t is not None:
                return TransferState(t.state, t.received, t.n_expected, t.reason)
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
                page = self.pool.pages[t.pages[slot]]
                data = page[: meta.nbytes]
                out.append(ReceivedChunk(slot, meta.num_tokens, meta.key, data, slot < t.held))
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
        with self._lock:
            t = self._by_id.get(transfer_id)
            if t is not None:
                t.extend(ttl)

    def transfer_ids(self) -> list[str]:
        """Transfers currently holding a reservation."""
        with self._lock:
            return list(self._by_id)

    @property
    def data_port(self) -> int:
        """The TCP data port actually bound (0 before start or without a TCP channel)."""
        return max((channel.data_port for channel in self._channels.values()), default=0)

    # -- the channels' sink (any channel thread) --------------------------------------------------

    def data_session(self, sid: bytes) -> Session:
        """The authenticated session ``sid`` (raises UnknownSession / AuthenticationFailed /
        ProtocolViolation)."""
        return self._sessions.get(sid)

    def live(self, session: Session) -> bool:
        return self._sessions.live(session)

    def begin_chunk(
        self, session: Session, handle: int, index: int, nbytes: int, num_tokens: int
    ) -> ChunkTarget | str:
        """Validate a chunk's addressing. Returns where to write it (slot marked WRITING) or a
        reason string for a chunk to drain and ignore; raises ProtocolViolation when the peer
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
            slot = index
            if not 0 <= slot < len(t.pages):
                raise ProtocolViolation(
                    f"chunk {index} outside the reservation of {len(t.pages)} pages"
                )
            if t.state is not RecvState.RECEIVING:
                return "write_after_" + t.state.value.lower()
            if t.slots[slot] is not SlotState.EMPTY:
                return "duplicate_chunk"
            if t.expected is not None and index >= t.expected:
                return "chunk_after_finish"
            t.slots[slot] = SlotState.WRITING
            t.writers += 1
            return ChunkTarget(t, slot, t.pages[slot])

    def end_chunk(
        self, target: ChunkTarget, nbytes: int, num_tokens: int, key: bytes, error: str
    ) -> None:
        """Commit (error == "") or fail a chunk begun with :meth:`begin_chunk`."""
        t, slot = target.reservation, target.slot
        with self._lock:
            t.writers -= 1
            if error:
                t.slots[slot] = SlotState.EMPTY
                self._fail_locked(t, error)
            elif t.state is RecvState.RECEIVING:
                t.slots[slot] = SlotState.VERIFIED
                t.meta[slot] = ChunkMeta(nbytes, num_tokens, key)
                t.received += 1
                self.metrics.chunks_total.inc()
                self.metrics.bytes_total.inc(nbytes)
                self._check_complete_locked(t)
            if t.releasable:
                self._free_locked(t)

    # -- transfer bookkeeping (callers hold self._lock) -----------------------------------------

    def _free_locked(self, t: Reservation) -> None:
        if t.pages:
            self.pool.release(t.pages)
            t.pages = []
            self.metrics.pool_pages_used.set(self.pool.occupancy())

    def _end_locked(self, t: Reservation, tombstone: str, fail_reason: str) -> None:
        if t.state is RecvState.RECEIVING:
            self._fail_locked(t, fail_reason)
        t.ended = True
        if t.held and self._held is not None:
            self._held.drop(t.transfer_id)
        self._by_id.pop(t.transfer_id, None)
        self._by_handle.pop(t.handle, None)
        self._tombstones[t.transfer_id] = tombstone
        self._ended_handles[t.handle] = (t.state is RecvState.COMPLETE, t.reason or tombstone)
        while len(self._tombstones) > MAX_TOMBSTONES:
            self._tombstones.popitem(last=False)
        while len(self._ended_handles) > MAX_TOMBSTONES:
            self._ended_handles.popitem(last=False)
        if not t.session.fenced and t.state is not RecvState.COMPLETE:
            # A remote WRITE may still be in flight for an unfinished transfer (D cannot fence
            # it): keep its pages out of circulation for a grace period so a late write can
            # never land in another transfer's page.
            t.writers += 1
            self._quarantine.append((time.monotonic() + NIXL_QUARANTINE, t))
        if t.releasable:
            self._free_locked(t)

    def _fail_locked(self, t: Reservation, reason: str) -> None:
        if t.state is not RecvState.RECEIVING:
            return
        t.state = RecvState.FAILED
        t.reason = reason
        self.metrics.failure(reason)
        self.metrics.transfer_outcome("failed")
        self._resolve_locked(t)

    def _resolve_locked(self, t: Reservation) -> None:
        self._changed.notify_all()
        if t.waiters:
            self._resolved.append(t)
            self._wake()

    def _check_complete_locked(self, t: Reservation) -> None:
        if t.state is not RecvState.RECEIVING or not t.all_verified():
            return
        t.expected = t.n_expected
        t.state = RecvState.COMPLETE
        t.extend(self.config.reservation_ttl)
        self.metrics.transfer_outcome("complete")
        self._resolve_locked(t)

    # -- control plane --------------------------------------------------------------------------

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.wake()

    def _ctl_loop(self) -> None:
        router = self._router
        wakeup = self._wakeup
        assert router is not None and wakeup is not None
        channels = list(self._channels.values())
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(wakeup.fileno(), zmq.POLLIN)
        next_sweep = 0.0
        while not self._stop.is_set():
            busy = any(channel.busy() for channel in channels)
            timeout = _CTL_BUSY_POLL_MS if busy else _CTL_IDLE_POLL_MS
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
            for channel in channels:
                channel.poll()
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
                if held.releasable:
                    self._free_locked(held)
            for t in [t for t in self._by_id.values() if t.expires <= now]:
                if t.state is RecvState.COMPLETE:
                    self.metrics.failure("ttl_expired_unclaimed")
                self._end_locked(t, "ttl_expired", "ttl_expired")
                logger.info("reservation %s expired after its TTL", t.transfer_id)
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

    def _keep_session(self, session: Session) -> None:
        for evicted in self._sessions.add(session):
            for channel in self._channels.values():
                channel.forget(evicted)

    def _on_hello(self, hello: Hello) -> HelloReply:
        sessions.check_hello(hello, self.fingerprint)
        secret = self.config.cluster_secret
        session, proof = sessions.new_session(hello, self.fingerprint, secret)
        accepted: list[ChannelOffer] = []
        for offer in hello.channels:
            channel = self._channels.get(offer.name)
            if channel is None or any(a.name == offer.name for a in accepted):
                continue
            params = channel.accept(session, offer.params)
            if params is not None:
                accepted.append(ChannelOffer(offer.name, params))
                session.fenced = session.fenced and channel.fenced
        self._keep_session(session)
        return HelloReply(
            rid=hello.rid,
            version=PROTOCOL_VERSION,
            fingerprint=self.fingerprint,
            nonce=session.d_nonce,
            proof=proof,
            auth_required=secret is not None,
            session=session.sid,
            page_bytes=self.page_bytes,
            n_pages=self.pool.n_pages,
            channels=accepted,
        )

    def _on_auth(self, request: Auth) -> AuthReply:
        secret = self.config.cluster_secret
        if secret is None:
            return AuthReply(request.rid, True)
        session = self._sessions.pop_half_open(request.session)
        if not sessions.verify_auth(session, request.proof, self.fingerprint, secret):
            logger.warning("KV sender failed HMAC authentication; session refused")
            raise AuthenticationFailed("HMAC proof did not verify: wrong or missing cluster_secret")
        session.authed = True
        self._keep_session(session)
        return AuthReply(request.rid, True)

    def _on_reserve(self, request: Reserve) -> ReserveReply:
        session = self._sessions.get(request.session)
        if not request.transfer_id or len(request.transfer_id) > MAX_TRANSFER_ID_LEN:
            raise ProtocolViolation("transfer id empty or too long")
        if not 0 < request.n_pages <= self.pool.n_pages:
            raise NoRoom(
                f"{request.n_pages} pages requested; the pool has {self.pool.n_pages} in total"
            )
        if not request.ttl > 0:
            raise ProtocolViolation(f"bad ttl {request.ttl}")
        keys = request.keys
        if keys and (
            len(keys) != request.n_pages or any(not 0 < len(k) <= MAX_KEY_BYTES for k in keys)
        ):
            raise ProtocolViolation("reservation keys do not match its pages")
        ttl = min(request.ttl, self.config.reservation_ttl)
        with self._lock:
            if request.transfer_id in self._by_id or request.transfer_id in self._tombstones:
                raise DuplicateTransfer(f"transfer id {request.transfer_id!r} was already used")
            pages = self.pool.acquire(request.n_pages)
            handle = next(self._handles)
            t = Reservation(
                transfer_id=request.transfer_id,
                handle=handle,
                session=session,
                pages=pages,
                expires=time.monotonic() + ttl,
            )
            self._by_id[t.transfer_id] = t
            self._by_handle[handle] = t
        self.metrics.pool_pages_used.set(self.pool.occupancy())
        held = self._mark_held(t, keys)
        return ReserveReply(request.rid, handle, list(pages), held)

    def _mark_held(self, t: Reservation, keys: Sequence[bytes]) -> int:
        """Ask D's store which leading chunks it holds (at most all but the last, so P always
        pushes one and finishes normally); mark their slots verified. Returns how many."""
        if self._held is None or len(keys) < 2:
            return 0
        try:
            # A complete transfer's TTL restarts once (on completion): the lease outlives both.
            ttl = 2 * self.config.reservation_ttl
            n = self._held.held(t.transfer_id, keys[:-1], ttl)
        except Exception:  # the store failing means pushing everything, never a refusal
            logger.exception("chunk store lookup for reservation %s failed", t.transfer_id)
            n = 0
        n = max(0, min(n, len(keys) - 1))
        with self._lock:
            if n and (t.ended or t.state is not RecvState.RECEIVING):
                n = 0
            if n:
                nbytes = self.page_bytes
                chunk = self.fingerprint.chunk_size
                for slot in range(n):
                    t.slots[slot] = SlotState.VERIFIED
                    t.meta[slot] = ChunkMeta(nbytes, chunk, keys[slot])
                t.received += n
                t.held = n
        if not n:
            self._held.drop(t.transfer_id)
        return n

    def _on_finish(self, request: Finish, ident: bytes) -> FinishReply | None:
        session = self._sessions.get(request.session)
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
        session = self._sessions.get(request.session)
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
