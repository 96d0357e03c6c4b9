"""Keeping the index in step with one worker's KV event stream (pure logic, no sockets).

One :class:`SourceTracker` per worker publisher. It is driven by the subscriber thread with
decoded messages and the current monotonic time, and tells it when to ask for a snapshot.

States (:class:`SyncState`):

* ``waiting``   - nothing heard yet; a snapshot is requested at once.
* ``resyncing`` - the stream cannot be trusted (first contact, a restart, a sequence gap, a
  heartbeat announcing batches we never got). Batches are buffered (bounded) until a snapshot
  arrives; the snapshot replaces the worker's entries and the buffered batches after its ``seq``
  are applied on top. A snapshot not answered within ``snapshot_timeout`` is asked for again.
* ``synced``    - every batch ``last_seq + 1`` is applied as it comes.
* ``expired``   - no message for ``expiry`` seconds (``expiry_heartbeats`` of the publisher's own
  heartbeat interval, at least ``min_expiry``): the worker's entries are dropped. Any message
  moves it back to ``resyncing``.

A publisher restart shows as a new ``(publisher, epoch)``: the worker's entries are dropped at
once (its cache may be gone) and it resyncs. A message whose fingerprint differs from the one its
epoch started with is invalid and ignored.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass

from lmcache_disagg.proxy.kvindex import KVIndex
from lmcache_disagg.transfer.events import EventBatch, Heartbeat, PubMessage, SnapshotReply
from lmcache_disagg.transfer.protocol import LayoutFingerprint

__all__ = ["SourceCounters", "SourceTracker", "SyncSettings", "SyncState"]


class SyncState(enum.Enum):
    WAITING = "waiting"
    RESYNCING = "resyncing"
    SYNCED = "synced"
    EXPIRED = "expired"


@dataclass(frozen=True)
class SyncSettings:
    expiry_heartbeats: float = 3.0
    min_expiry: float = 1.0
    default_expiry: float = 5.0
    """Expiry before the first heartbeat tells us the publisher's interval."""
    snapshot_timeout: float = 2.0
    max_buffered_batches: int = 1024

    def validate(self) -> None:
        for name in ("expiry_heartbeats", "min_expiry", "default_expiry", "snapshot_timeout"):
            if not 0 < getattr(self, name) <= 3600:
                raise ValueError(f"{name} must be in (0, 3600]")
        if self.max_buffered_batches < 1:
            raise ValueError("max_buffered_batches must be >= 1")


@dataclass
class SourceCounters:
    batches: int = 0
    events: int = 0
    lost_batches: int = 0
    """Batches known to be missing (sequence gaps), each one made good by a resync."""
    gaps: int = 0
    resyncs: int = 0
    restarts: int = 0
    expiries: int = 0
    invalid: int = 0
    stale: int = 0
    """Batches at or below the applied sequence number (duplicates, replays): ignored."""
    snapshot_requests: int = 0


@dataclass(frozen=True)
class _Identity:
    publisher: str
    epoch: int
    fingerprint: LayoutFingerprint


class SourceTracker:
    def __init__(self, worker: str, index: KVIndex, settings: SyncSettings) -> None:
        settings.validate()
        self.worker = worker
        self.counters = SourceCounters()
        self.state = SyncState.WAITING
        self._index = index
        self._settings = settings
        self._identity: _Identity | None = None
        self._last_seq = 0
        self._buffer: deque[EventBatch] = deque(maxlen=settings.max_buffered_batches)
        self._last_heard: float | None = None
        self._expiry = settings.default_expiry
        self._snapshot_deadline: float | None = None

    @property
    def last_seq(self) -> int:
        return self._last_seq

    # -- inputs --------------------------------------------------------------------------------
    def on_message(self, message: PubMessage, now: float) -> None:
        if not self._adopt(message.publisher, message.epoch, message.fingerprint):
            self.counters.invalid += 1
            return
        self._last_heard = now
        if self.state in (SyncState.EXPIRED, SyncState.WAITING):
            self._start_resync()
        if isinstance(message, Heartbeat):
            self._expiry = max(
                self._settings.min_expiry, self._settings.expiry_heartbeats * message.interval
            )
            if self.state is SyncState.SYNCED and message.seq != self._last_seq:
                if message.seq > self._last_seq:
                    self.counters.lost_batches += message.seq - self._last_seq
                self.counters.gaps += 1
                self._start_resync()
            return
        self._on_batch(message)

    def on_snapshot(self, reply: SnapshotReply, now: float) -> None:
        if not self._adopt(reply.publisher, reply.epoch, reply.fingerprint):
            self.counters.invalid += 1
            return
        self._last_heard = now
        self._snapshot_deadline = None
        if self.state is SyncState.SYNCED and reply.seq <= self._last_seq:
            return  # a late answer to an earlier request: we are already past it
        self._index.replace(
            self.worker, reply.fingerprint, {entry.tier: entry.keys for entry in reply.tiers}
        )
        self.counters.resyncs += 1
        self._last_seq = reply.seq
        self.state = SyncState.SYNCED
        buffered = sorted(self._buffer, key=lambda batch: batch.seq)
        self._buffer.clear()
        for batch in buffered:
            if self.state is SyncState.SYNCED:
                self._on_batch(batch)
            else:
                self._buffer.append(batch)

    def tick(self, now: float) -> None:
        """Expire a silent worker."""
        if (
            self._last_heard is not None
            and self.state is not SyncState.EXPIRED
            and now - self._last_heard > self._expiry
        ):
            self._index.drop_worker(self.worker)
            self.counters.expiries += 1
            self.state = SyncState.EXPIRED
            self._buffer.clear()
            self._snapshot_deadline = None

    def wants_snapshot(self, now: float) -> bool:
        if self.state not in (SyncState.WAITING, SyncState.RESYNCING):
            return False
        return self._snapshot_deadline is None or now >= self._snapshot_deadline

    def snapshot_requested(self, now: float) -> None:
        self.counters.snapshot_requests += 1
        self._snapshot_deadline = now + self._settings.snapshot_timeout

    # -- internals -----------------------------------------------------------------------------
    def _adopt(self, publisher: str, epoch: int, fingerprint: LayoutFingerprint) -> bool:
        """Track a new (publisher, epoch); False when a message contradicts the current one."""
        current = self._identity
        if current is not None and (current.publisher, current.epoch) == (publisher, epoch):
            return current.fingerprint == fingerprint
        if current is not None:
            self.counters.restarts += 1
            self._index.drop_worker(self.worker)
        self._identity = _Identity(publisher, epoch, fingerprint)
        self._last_seq = 0
        self._buffer.clear()
        self._start_resync()
        return True

    def _start_resync(self) -> None:
        if self.state is not SyncState.RESYNCING:
            self.state = SyncState.RESYNCING
            self._snapshot_deadline = None

    def _on_batch(self, batch: EventBatch) -> None:
        if self.state is not SyncState.SYNCED:
            self._buffer.append(batch)
            return
        if batch.seq <= self._last_seq:
            self.counters.stale += 1
            return
        if batch.seq != self._last_seq + 1:
            self.counters.lost_batches += batch.seq - self._last_seq - 1
            self.counters.gaps += 1
            self._start_resync()
            self._buffer.append(batch)
            return
        self._index.apply(self.worker, batch.fingerprint, batch.events)
        self._last_seq = batch.seq
        self.counters.batches += 1
        self.counters.events += len(batch.events)
