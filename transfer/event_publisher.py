"""A worker's KV event publisher: batches chunk-store events onto a ZMQ PUB socket (torch-free).

Wire format: :mod:`lmcache_disagg.transfer.events`. One publisher per chunk store (per TP rank).

Threads: the store's threads call :meth:`KVEventPublisher.stored` / :meth:`evicted` /
:meth:`promoted`; they only append to a bounded pending list and update the publisher's own view
of the key set (``_keys``) under one lock, so they never block on the network. A named background
thread owns both sockets: every ``batch_interval`` it sends the pending events as batches with
consecutive sequence numbers, every ``heartbeat_interval`` it sends a heartbeat, and it answers
snapshot requests on a ROUTER socket with the key set as of a sequence number.

Bounds: at most ``max_pending_keys`` keys wait for the next batch. When that overflows, new events
are dropped from the batch stream but still applied to the key set, and the next batch skips one
sequence number on purpose, so every subscriber sees a gap and resyncs from a snapshot (which is
exact). PUB itself drops at its high-water mark (``send_hwm``) the same way a slow subscriber
would notice. The key set holds at most ``max_tracked_keys`` keys (oldest first out).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import zmq

from lmcache_disagg.transfer.events import (
    MAX_BATCH_KEYS,
    MAX_SNAPSHOT_KEYS,
    TIERS,
    TOPIC,
    ChunkEvent,
    ChunkEvicted,
    ChunkPromoted,
    ChunkStored,
    EventBatch,
    Heartbeat,
    SnapshotReply,
    SnapshotRequest,
    TierKeys,
    TierName,
    decode_snapshot,
    encode,
)
from lmcache_disagg.transfer.protocol import LayoutFingerprint

__all__ = [
    "KVEventPublisher",
    "PublisherSettings",
    "PublisherStats",
    "snapshot_endpoint_for",
    "split_endpoint",
]

logger = logging.getLogger(__name__)

_TIER_BIT: dict[TierName, int] = {tier: 1 << i for i, tier in enumerate(TIERS)}
_SNAPSHOT_REQUEST_MAX = 4096
"""Largest snapshot request accepted (zmq MAXMSGSIZE on the ROUTER socket)."""


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """``tcp://HOST:PORT`` -> (``tcp://HOST``, PORT); port 0 means "any free port"."""
    head, sep, port = endpoint.rpartition(":")
    if not sep or not head or not port.isdigit() or not 0 <= int(port) < 65535:
        raise ValueError(f"kv events endpoint {endpoint!r} must be tcp://HOST:PORT")
    return head, int(port)


def snapshot_endpoint_for(endpoint: str) -> str:
    """The default snapshot endpoint of a PUB endpoint: the same host, port + 1."""
    head, port = split_endpoint(endpoint)
    if port == 0:
        raise ValueError(f"kv events endpoint {endpoint!r} must be tcp://HOST:PORT")
    return f"{head}:{port + 1}"


@dataclass(frozen=True)
class PublisherSettings:
    """Where and how often a worker publishes.

    ``endpoint`` is bound (``tcp://HOST:PORT``; port 0 = any free port, see
    :attr:`KVEventPublisher.endpoint`). ``snapshot_endpoint`` defaults to the same host and
    port + 1 (any free port when ``endpoint``'s port is 0).
    """

    endpoint: str
    snapshot_endpoint: str | None = None
    batch_interval: float = 0.01
    heartbeat_interval: float = 1.0
    max_pending_keys: int = 1 << 16
    max_tracked_keys: int = MAX_SNAPSHOT_KEYS
    send_hwm: int = 10_000
    start_timeout: float = 5.0

    def validate(self) -> None:
        if not self.endpoint.startswith("tcp://"):
            raise ValueError(f"kv events endpoint {self.endpoint!r} must be tcp://HOST:PORT")
        for name in ("batch_interval", "heartbeat_interval", "start_timeout"):
            if not 0 < getattr(self, name) <= 3600:
                raise ValueError(f"{name} must be in (0, 3600] seconds")
        if self.max_pending_keys < 1 or self.max_tracked_keys < 1 or self.send_hwm < 1:
            raise ValueError("max_pending_keys, max_tracked_keys and send_hwm must be >= 1")
        if self.max_tracked_keys > MAX_SNAPSHOT_KEYS:
            raise ValueError(f"max_tracked_keys must be <= {MAX_SNAPSHOT_KEYS}")


@dataclass
class PublisherStats:
    batches: int = 0
    events: int = 0
    heartbeats: int = 0
    snapshots: int = 0
    dropped_keys: int = 0
    bad_requests: int = 0


@dataclass
class _Pending:
    events: list[ChunkEvent] = field(default_factory=list)
    keys: int = 0
    overflowed: bool = False


class KVEventPublisher:
    """Publishes one chunk store's events. ``start`` binds; ``close`` stops; both idempotent."""

    def __init__(
        self,
        settings: PublisherSettings,
        fingerprint: LayoutFingerprint,
        publisher_id: str | None = None,
    ) -> None:
        settings.validate()
        fingerprint.validate()
        self._settings = settings
        self._fingerprint = fingerprint
        self.publisher_id = publisher_id or f"{socket.gethostname()}:{os.getpid()}"
        self.epoch = secrets.randbits(63)
        self._lock = threading.Lock()
        self._pending = _Pending()
        self._keys: OrderedDict[bytes, int] = OrderedDict()
        self._seq = 0
        self._stats = PublisherStats()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.endpoint = settings.endpoint
        self.snapshot_endpoint = settings.snapshot_endpoint or ""

    # -- store side (any thread) ---------------------------------------------------------------
    def stored(self, keys: Sequence[bytes], tier: TierName) -> None:
        self._record(keys, tier, None, evict=False)

    def evicted(self, keys: Sequence[bytes], tier: TierName) -> None:
        self._record(keys, tier, None, evict=True)

    def promoted(self, keys: Sequence[bytes], tier: TierName, source: TierName) -> None:
        self._record(keys, tier, source, evict=False)

    def stats(self) -> PublisherStats:
        with self._lock:
            return PublisherStats(**vars(self._stats))

    @property
    def sequence(self) -> int:
        """The last batch sequence number assigned (0: none yet)."""
        with self._lock:
            return self._seq

    def idle(self) -> bool:
        """Nothing waits for the next batch (every recorded event has a sequence number)."""
        with self._lock:
            return not self._pending.events and not self._pending.overflowed

    def tracked_keys(self) -> int:
        with self._lock:
            return len(self._keys)

    def _record(
        self, keys: Sequence[bytes], tier: TierName, source: TierName | None, *, evict: bool
    ) -> None:
        if tier not in _TIER_BIT or (source is not None and source not in _TIER_BIT):
            raise ValueError(f"unknown tier {tier!r} / {source!r}")
        if not keys:
            return
        bit = _TIER_BIT[tier]
        with self._lock:
            for key in keys:
                mask = self._keys.pop(key, 0)
                mask = mask & ~bit if evict else mask | bit
                if mask:
                    self._keys[key] = mask
            while len(self._keys) > self._settings.max_tracked_keys:
                self._keys.popitem(last=False)
            pending = self._pending
            if pending.keys + len(keys) > self._settings.max_pending_keys:
                pending.overflowed = True
                self._stats.dropped_keys += len(keys)
                return
            for start in range(0, len(keys), MAX_BATCH_KEYS):
                part = list(keys[start : start + MAX_BATCH_KEYS])
                event: ChunkEvent
                if evict:
                    event = ChunkEvicted(part, tier)
                elif source is None:
                    event = ChunkStored(part, tier)
                else:
                    event = ChunkPromoted(part, tier, source)
                pending.events.append(event)
            pending.keys += len(keys)

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> KVEventPublisher:
        if self._thread is not None:
            return self
        self._thread = threading.Thread(target=self._run, name="kv-events-pub", daemon=True)
        self._thread.start()
        if not self._ready.wait(self._settings.start_timeout):
            self.close()
            raise TimeoutError("kv events publisher did not start in time")
        if self._error is not None:
            self._thread.join(self._settings.start_timeout)
            raise OSError(f"kv events publisher cannot bind: {self._error}") from self._error
        return self

    def close(self, timeout: float = 5.0) -> None:
        """Send what is pending, stop the thread and close the sockets (idempotent)."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    # -- the publisher thread ------------------------------------------------------------------
    def _run(self) -> None:
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        pub = ctx.socket(zmq.PUB)
        router = ctx.socket(zmq.ROUTER)
        try:
            pub.setsockopt(zmq.SNDHWM, self._settings.send_hwm)
            pub.setsockopt(zmq.LINGER, 0)
            router.setsockopt(zmq.LINGER, 0)
            router.setsockopt(zmq.MAXMSGSIZE, _SNAPSHOT_REQUEST_MAX)
            router.setsockopt(zmq.SNDHWM, 64)
            # Both binds share most of start()'s wait, so a port still held fails start() by name.
            deadline = time.monotonic() + 0.8 * self._settings.start_timeout
            self.endpoint = _bind(pub, self._settings.endpoint, deadline)
            wanted = self._settings.snapshot_endpoint or (
                self._settings.endpoint.rpartition(":")[0] + ":0"
                if self._settings.endpoint.endswith(":0")
                else snapshot_endpoint_for(self._settings.endpoint)
            )
            self.snapshot_endpoint = _bind(router, wanted, deadline)
        except (zmq.ZMQError, ValueError) as exc:
            self._error = exc
            pub.close()
            router.close()
            self._ready.set()
            return
        self._ready.set()
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        settings = self._settings
        next_flush = time.monotonic() + settings.batch_interval
        next_heartbeat = time.monotonic()
        try:
            while not self._stop.is_set():
                timeout_ms = int(
                    max(0.0, min(next_flush, next_heartbeat) - time.monotonic()) * 1000
                )
                if poller.poll(timeout_ms):
                    self._serve_snapshots(pub, router)
                now = time.monotonic()
                if now >= next_flush:
                    self._send_batches(pub, self._take_batches())
                    next_flush = now + settings.batch_interval
                if now >= next_heartbeat:
                    self._send_heartbeat(pub)
                    next_heartbeat = now + settings.heartbeat_interval
            self._send_batches(pub, self._take_batches())
        finally:
            pub.close()
            router.close()

    def _take_batches(self) -> list[EventBatch]:
        """Under the lock: turn pending events into numbered batches (the caller sends them)."""
        with self._lock:
            return self._take_batches_locked()

    def _take_batches_locked(self) -> list[EventBatch]:
        pending, self._pending = self._pending, _Pending()
        if pending.overflowed:
            self._seq += 1  # deliberate gap: subscribers resync from a snapshot
        batches: list[EventBatch] = []
        chunk: list[ChunkEvent] = []
        keys = 0
        for event in [*pending.events, None]:
            if event is None or keys + len(event.keys) > MAX_BATCH_KEYS:
                if chunk:
                    self._seq += 1
                    batches.append(
                        EventBatch(
                            self.publisher_id,
                            self.epoch,
                            self._seq,
                            self._fingerprint,
                            chunk,
                            time.time(),
                        )
                    )
                chunk, keys = [], 0
            if event is not None:
                chunk.append(event)
                keys += len(event.keys)
        if pending.overflowed and not batches:
            # The skipped number must be followed by a message that shows the gap: an empty batch.
            self._seq += 1
            batches.append(
                EventBatch(
                    self.publisher_id, self.epoch, self._seq, self._fingerprint, [], time.time()
                )
            )
        return batches

    def _send_batches(self, pub: zmq.Socket[bytes], batches: list[EventBatch]) -> None:
        for batch in batches:
            with contextlib.suppress(zmq.Again):  # at the HWM: subscribers see the gap
                pub.send_multipart([TOPIC, encode(batch)], flags=zmq.NOBLOCK)
            with self._lock:
                self._stats.batches += 1
                self._stats.events += len(batch.events)

    def _send_heartbeat(self, pub: zmq.Socket[bytes]) -> None:
        with self._lock:
            seq = self._seq
            self._stats.heartbeats += 1
        beat = Heartbeat(
            self.publisher_id, self.epoch, seq, self._fingerprint,
            self._settings.heartbeat_interval, time.time(),
        )  # fmt: skip
        with contextlib.suppress(zmq.Again):
            pub.send_multipart([TOPIC, encode(beat)], flags=zmq.NOBLOCK)

    def _serve_snapshots(self, pub: zmq.Socket[bytes], router: zmq.Socket[bytes]) -> None:
        for _ in range(16):
            try:
                frames = router.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 2:
                self._count_bad()
                continue
            identity, payload = frames
            try:
                request = decode_snapshot(payload)
            except ValueError as exc:
                logger.debug("kv events: bad snapshot request: %s", exc)
                self._count_bad()
                continue
            if not isinstance(request, SnapshotRequest):
                self._count_bad()
                continue
            with self._lock:
                batches = self._take_batches_locked()
                seq = self._seq
                by_tier: dict[TierName, list[bytes]] = {tier: [] for tier in TIERS}
                for key, mask in self._keys.items():
                    for tier, bit in _TIER_BIT.items():
                        if mask & bit:
                            by_tier[tier].append(key)
                self._stats.snapshots += 1
            self._send_batches(pub, batches)
            reply = SnapshotReply(
                self.publisher_id, self.epoch, seq, self._fingerprint,
                [TierKeys(tier, keys) for tier, keys in by_tier.items() if keys],
            )  # fmt: skip
            with contextlib.suppress(zmq.ZMQError):  # the requester is gone or slow; it retries
                router.send_multipart([identity, encode(reply)], flags=zmq.NOBLOCK)

    def _count_bad(self) -> None:
        with self._lock:
            self._stats.bad_requests += 1


def _bind(sock: zmq.Socket[bytes], endpoint: str, deadline: float) -> str:
    """Bind ``endpoint``; a fixed port still in use is retried until ``deadline`` (monotonic).

    zmq closes a socket's listening fd asynchronously (on its I/O thread), so a publisher
    restarted in the same process, or a worker restarted right after its predecessor exited, can
    find its own port still held for a moment.
    """
    head, port = split_endpoint(endpoint)
    if port == 0:
        sock.bind(f"{head}:*")
    else:
        while True:
            try:
                sock.bind(endpoint)
                break
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EADDRINUSE or time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)
    bound = sock.getsockopt(zmq.LAST_ENDPOINT)
    return bound.decode() if isinstance(bound, bytes) else str(bound)
