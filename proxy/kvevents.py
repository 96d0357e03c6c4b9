"""The proxy's KV events subscriber: one background thread feeding :class:`KVIndex`.

For every worker it connects a SUB socket to the worker's PUB endpoint and a DEALER socket to its
snapshot endpoint, decodes and validates every message (:mod:`lmcache_disagg.transfer.events`),
and drives that worker's :class:`~lmcache_disagg.proxy.kvsync.SourceTracker`, which detects gaps,
restarts and silence and asks for snapshots. Nothing here blocks the proxy's event loop: the
thread polls with a short timeout, checks a stop event, and is joined in :meth:`close`.

The set of sources can change at run time (:meth:`KVEventSubscriber.set_sources`, for workers
added or removed through the proxy's ``/workers``): the change is recorded under the lock and the
thread opens or closes sockets at its next poll round; a removed source's messages still queued
are dropped, never applied.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import zmq

from lmcache_disagg.proxy.kvindex import KVIndex
from lmcache_disagg.proxy.kvsync import SourceCounters, SourceTracker, SyncSettings, SyncState
from lmcache_disagg.transfer.events import (
    MAX_EVENT_MESSAGE,
    TOPIC,
    SnapshotReply,
    SnapshotRequest,
    decode_pub,
    decode_snapshot,
    encode,
)

__all__ = ["EventSource", "KVEventSubscriber", "SubscriberStats"]

logger = logging.getLogger(__name__)

_MAX_PER_POLL = 256
"""Messages read from one socket per poll round, so one busy worker cannot starve the others."""


@dataclass(frozen=True)
class EventSource:
    """A worker (named as the proxy names it, e.g. its HTTP address) and its event endpoints."""

    worker: str
    endpoint: str
    snapshot_endpoint: str


@dataclass(frozen=True)
class SubscriberStats:
    totals: SourceCounters
    states: dict[str, SyncState]


@dataclass
class _Source:
    spec: EventSource
    tracker: SourceTracker
    sub: zmq.Socket[bytes]
    dealer: zmq.Socket[bytes]


class KVEventSubscriber:
    """Subscribes to every source's events; ``start`` returns once the sockets are connected."""

    def __init__(
        self,
        sources: Sequence[EventSource],
        index: KVIndex,
        settings: SyncSettings | None = None,
        *,
        poll_interval: float = 0.05,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._index = index
        self._settings = settings or SyncSettings()
        self._settings.validate()
        self._poll_ms = max(1, int(poll_interval * 1000))
        self._clock = clock
        self._lock = threading.Lock()
        self._specs: list[EventSource] = []
        self._trackers: dict[str, SourceTracker] = {}
        self._retired = SourceCounters()
        """Counters of removed sources, so the totals never go backwards."""
        self._changed = False
        """Set under the lock by :meth:`set_sources`; the thread reconciles its sockets."""
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self.set_sources(sources)

    def start(self, timeout: float = 5.0) -> KVEventSubscriber:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="kv-events-sub", daemon=True)
            self._thread.start()
            if not self._ready.wait(timeout):
                self.close()
                raise TimeoutError("kv events subscriber did not start in time")
        return self

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def stats(self) -> SubscriberStats:
        with self._lock:
            totals = SourceCounters()
            for counters in (self._retired, *(t.counters for t in self._trackers.values())):
                _accumulate(totals, counters)
            states = {name: tracker.state for name, tracker in self._trackers.items()}
        return SubscriberStats(totals, states)

    def sources(self) -> tuple[EventSource, ...]:
        with self._lock:
            return tuple(self._specs)

    def set_sources(self, sources: Sequence[EventSource]) -> None:
        """Subscribe to exactly ``sources`` from now on (workers added or removed at run time).

        A source that is new, or whose endpoints changed, starts from ``waiting`` (it resyncs from
        a snapshot); a removed worker's entries leave the index. The thread applies the change
        within one poll interval.
        """
        names = [source.worker for source in sources]
        if len(set(names)) != len(names):
            raise ValueError(f"kv event sources name a worker twice: {names}")
        with self._lock:
            for spec in self._specs:
                if spec not in sources:  # removed, or its endpoints changed
                    _accumulate(self._retired, self._trackers.pop(spec.worker).counters)
                    self._index.drop_worker(spec.worker)
            for spec in sources:
                if spec.worker not in self._trackers:
                    self._trackers[spec.worker] = SourceTracker(
                        spec.worker, self._index, self._settings
                    )
            self._specs = list(sources)
            self._changed = True

    def synced(self, worker: str, seq: int | None = None) -> bool:
        """Whether ``worker``'s stream is applied (up to at least ``seq`` when given)."""
        with self._lock:
            tracker = self._trackers[worker]
            return tracker.state is SyncState.SYNCED and (seq is None or tracker.last_seq >= seq)

    # -- the thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        sources: dict[str, _Source] = {}
        poller = zmq.Poller()
        try:
            self._reconcile(ctx, poller, sources)
            self._ready.set()
            while not self._stop.is_set():
                ready = dict(poller.poll(self._poll_ms))
                for source in sources.values():
                    if source.sub in ready:
                        self._drain_sub(source)
                    if source.dealer in ready:
                        self._drain_snapshots(source)
                if self._changed:
                    self._reconcile(ctx, poller, sources)
                now = self._clock()
                with self._lock:
                    for source in sources.values():
                        if not self._live_locked(source):
                            continue  # removed by set_sources; its sockets go next round
                        source.tracker.tick(now)
                        if source.tracker.wants_snapshot(now):
                            self._request_snapshot(source, now)
        finally:
            self._ready.set()
            for source in sources.values():
                source.sub.close()
                source.dealer.close()

    def _reconcile(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        poller: zmq.Poller,
        sources: dict[str, _Source],
    ) -> None:
        """Make the thread's sockets match ``_specs`` (all of them on the first call).

        :meth:`set_sources` gives a changed source a new tracker, so a socket pair whose tracker
        is no longer the worker's is stale."""
        with self._lock:
            specs = {spec.worker: spec for spec in self._specs}
            trackers = dict(self._trackers)
            self._changed = False
        for worker, source in list(sources.items()):
            if trackers.get(worker) is not source.tracker:
                for sock in (source.sub, source.dealer):
                    poller.unregister(sock)
                    sock.close()
                del sources[worker]
        for worker, spec in specs.items():
            if worker in sources:
                continue
            sub = ctx.socket(zmq.SUB)
            dealer = ctx.socket(zmq.DEALER)
            for sock in (sub, dealer):
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.MAXMSGSIZE, MAX_EVENT_MESSAGE)
            sub.setsockopt(zmq.SUBSCRIBE, TOPIC)
            sub.setsockopt(zmq.RCVHWM, 10_000)
            dealer.setsockopt(zmq.SNDHWM, 4)
            sub.connect(spec.endpoint)
            dealer.connect(spec.snapshot_endpoint)
            poller.register(sub, zmq.POLLIN)
            poller.register(dealer, zmq.POLLIN)
            sources[worker] = _Source(spec, trackers[worker], sub, dealer)

    def _live_locked(self, source: _Source) -> bool:
        """Whether ``source`` is still subscribed (a removed one must not touch the index)."""
        return self._trackers.get(source.spec.worker) is source.tracker

    def _drain_sub(self, source: _Source) -> None:
        for _ in range(_MAX_PER_POLL):
            try:
                frames = source.sub.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            with self._lock:
                if not self._live_locked(source):
                    return
                if len(frames) != 2 or frames[0] != TOPIC:
                    source.tracker.counters.invalid += 1
                    continue
                try:
                    message = decode_pub(frames[1])
                except ValueError as exc:
                    logger.debug("kv events from %s: %s", source.spec.worker, exc)
                    source.tracker.counters.invalid += 1
                    continue
                source.tracker.on_message(message, self._clock())

    def _drain_snapshots(self, source: _Source) -> None:
        for _ in range(4):
            try:
                frames = source.dealer.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            with self._lock:
                if not self._live_locked(source):
                    return
                try:
                    if len(frames) != 1:
                        raise ValueError(f"{len(frames)} frames")
                    reply = decode_snapshot(frames[0])
                    if not isinstance(reply, SnapshotReply):
                        raise ValueError("not a snapshot reply")
                except ValueError as exc:
                    logger.debug("kv snapshot from %s: %s", source.spec.worker, exc)
                    source.tracker.counters.invalid += 1
                    continue
                source.tracker.on_snapshot(reply, self._clock())

    def _request_snapshot(self, source: _Source, now: float) -> None:
        # Again: the worker is unreachable; the snapshot deadline retries later.
        with contextlib.suppress(zmq.Again):
            source.dealer.send(encode(SnapshotRequest()), flags=zmq.NOBLOCK)
        source.tracker.snapshot_requested(now)


def _accumulate(totals: SourceCounters, counters: SourceCounters) -> None:
    for f in fields(SourceCounters):
        setattr(totals, f.name, getattr(totals, f.name) + getattr(counters, f.name))
