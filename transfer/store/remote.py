"""L3: Redis / Valkey / Redis Cluster through redis-py's asyncio client, on our own loop thread.

* One key per chunk, ``lmcd:<fingerprint digest hex>:<key hex>``, holding the whole record
  (:mod:`.format`); one small bounded list per parent, ``lmcd:<digest>:c:<parent hex>``, naming
  its most recent children so a lookup can match a chunk finer than whole keys. Both get
  ``remote_ttl``.
* Concurrency is bounded (``remote_max_connections`` commands in flight, a bounded pool) and every
  call runs under ``remote_timeout``. Failures are misses, never exceptions: each is counted as
  a fault by reason (``timeout``, ``unavailable``, ``bad_size``, ``checksum``) and logged once
  per reason.
* URLs: ``redis://``, ``rediss://`` (TLS), ``valkey://`` / ``valkeys://`` (the same protocol),
  ``redis+cluster://`` / ``rediss+cluster://`` or ``cluster=True`` for a Redis Cluster. TLS
  options ride in the query string as redis-py reads them (``?ssl_ca_certs=/ca.pem``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.cluster import RedisCluster
from redis.backoff import NoBackoff
from redis.retry import Retry

from lmcache_disagg.transfer.store.errors import RecordError
from lmcache_disagg.transfer.store.format import HEADER_SIZE, decode_header, header_tokens
from lmcache_disagg.transfer.store.metrics import StoreMetrics
from lmcache_disagg.transfer.store.tier import Tier

__all__ = [
    "BACKOFF",
    "BACKOFF_REASON",
    "INFLIGHT_WRITE_BYTES",
    "RemoteTier",
    "normalize_remote_url",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_SCHEMES = {
    "redis": ("redis", False),
    "rediss": ("rediss", False),
    "valkey": ("redis", False),
    "valkeys": ("rediss", False),
    "redis+cluster": ("redis", True),
    "rediss+cluster": ("rediss", True),
    "valkey+cluster": ("redis", True),
    "valkeys+cluster": ("rediss", True),
}
# A parent's children list keeps the most recent this many children (a bounded list).
_MAX_CHILDREN = 32
_CLUSTER_RETRIES = 3
# Records submitted to L3 and not yet acknowledged hold at most about this many bytes.
INFLIGHT_WRITE_BYTES = 256 << 20
# Reads pause this long after the server timed out or was unreachable.
BACKOFF = 1.0
BACKOFF_REASON = "backoff"
# Extra wait on the caller's side beyond the in-loop deadline (loop scheduling).
_GRACE = 0.25


def normalize_remote_url(url: str, cluster: bool = False) -> tuple[str, bool]:
    """``valkeys://h:1`` -> (``rediss://h:1``, False); ``redis+cluster://h:1`` -> (..., True)."""
    scheme, sep, rest = url.partition("://")
    mapped = _SCHEMES.get(scheme.lower())
    if not sep or mapped is None:
        raise ValueError(f"unsupported remote_url scheme in {url!r}")
    return f"{mapped[0]}://{rest}", cluster or mapped[1]


def _reason_of(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError | asyncio.TimeoutError | redis.exceptions.TimeoutError):
        return "timeout"
    if isinstance(exc, redis.exceptions.ResponseError) and "WRONGTYPE" in str(exc):
        return "bad_size"
    return "unavailable"


class RemoteTier:
    def __init__(
        self,
        url: str,
        digest: bytes,
        chunk_size: int,
        metrics: StoreMetrics,
        cluster: bool = False,
        timeout: float = 0.5,
        max_connections: int = 16,
        ttl: float | None = None,
        record_bytes: int = 1 << 20,
    ) -> None:
        self.url, self.cluster = normalize_remote_url(url, cluster)
        self.timeout = timeout
        self.max_connections = max_connections
        self.ttl = ttl
        self._namespace = f"lmcd:{digest.hex()}:"
        self._chunk_size = chunk_size
        self._digest = digest
        self._metrics = metrics
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._client: Any = None
        self._slots: asyncio.Semaphore | None = None
        self._init_lock: asyncio.Lock | None = None
        self._initialized = False
        self._lock = threading.Condition()
        self._inflight = 0
        self._logged: set[str] = set()
        self._down_until = 0.0
        # Bounds write-through commands submitted and not yet answered; each holds a copy of its
        # record, so the bound is in bytes too.
        slots = min(2 * max_connections, max(1, INFLIGHT_WRITE_BYTES // max(1, record_bytes)))
        self._put_slots = threading.BoundedSemaphore(max(1, slots))

    # -- names -------------------------------------------------------------------------------
    def key_name(self, key: bytes) -> str:
        return self._namespace + key.hex()

    def children_name(self, parent: bytes) -> str:
        return self._namespace + "c:" + parent.hex()

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Start the loop thread and build the client (no network yet: a down server is only
        a miss later)."""
        if self._thread is not None:
            return
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        self._thread = threading.Thread(target=run, name="chunkstore-l3", daemon=True)
        self._thread.start()
        if not ready.wait(5.0):
            raise RuntimeError("L3 event loop did not start")
        self._loop = loop
        asyncio.run_coroutine_threadsafe(self._build(), loop).result(5.0)

    async def _build(self) -> None:
        common: dict[str, Any] = {
            "socket_timeout": self.timeout,
            "socket_connect_timeout": self.timeout,
            "retry": Retry(NoBackoff(), 0),
        }
        if self.cluster:
            # The cluster client re-reads the slot map and retries on a moved/closed node
            # connection (e.g. while it first learns the topology); our deadline still bounds it.
            common["retry"] = Retry(NoBackoff(), _CLUSTER_RETRIES)
            self._client = RedisCluster.from_url(
                self.url, max_connections=self.max_connections, **common
            )
        else:
            pool = aioredis.BlockingConnectionPool.from_url(
                self.url, max_connections=self.max_connections, timeout=self.timeout, **common
            )
            self._client = aioredis.Redis(connection_pool=pool)
        self._slots = asyncio.Semaphore(self.max_connections)
        self._init_lock = asyncio.Lock()

    def close(self, timeout: float) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self.flush(timeout)
        try:
            asyncio.run_coroutine_threadsafe(self._aclose(), loop).result(max(0.1, timeout))
        except (concurrent.futures.TimeoutError, Exception) as exc:  # closing is best effort
            logger.debug("L3 client close: %s", exc)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(max(0.1, timeout))
        if not thread.is_alive():
            loop.close()
        self._loop = None
        self._thread = None

    async def _aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    # -- calls -------------------------------------------------------------------------------
    async def _bounded(self, make: Callable[[], Awaitable[T]], timeout: float) -> T:
        assert self._slots is not None and self._init_lock is not None
        async with asyncio.timeout(timeout):
            if self.cluster and not self._initialized:
                # One caller learns the slot map; concurrent first commands would race on it.
                async with self._init_lock:
                    if not self._initialized:
                        await self._client.initialize()
                        self._initialized = True
            async with self._slots:
                return await make()

    def _call(
        self, make: Callable[[], Awaitable[T]], timeout: float | None = None
    ) -> tuple[T | None, str | None]:
        """Run one bounded read from any thread: (result, None) or (None, fault reason).

        After a timeout or an unreachable server, reads are skipped (reason ``backoff``, a miss
        that is not a new fault) for ``BACKOFF`` seconds, so a hung server costs one deadline,
        not one per lookup. Writes are always attempted."""
        loop = self._loop
        if loop is None:
            return None, "unavailable"
        if time.monotonic() < self._down_until:
            return None, BACKOFF_REASON
        limit = self.timeout if timeout is None else min(timeout, self.timeout)
        future = asyncio.run_coroutine_threadsafe(self._bounded(make, limit), loop)
        try:
            return future.result(limit + _GRACE), None
        except concurrent.futures.TimeoutError:
            future.cancel()
            reason = "timeout"
        except Exception as exc:
            reason = _reason_of(exc)
        if reason in ("timeout", "unavailable"):
            self._down_until = time.monotonic() + BACKOFF
        return None, reason

    def log_fault(self, reason: str, message: str) -> None:
        with self._lock:
            first = reason not in self._logged
            self._logged.add(reason)
        if first:
            logger.warning(
                "L3 %s fault (%s): %s (further %s faults are only counted)",
                self.url.partition("@")[2] or self.url,
                reason,
                message,
                reason,
            )

    def _fault(self, reason: str, what: str) -> None:
        self._metrics.count("faults", Tier.L3, reason=reason)
        self.log_fault(reason, what)

    def _pipeline(self) -> Any:
        """A non-transactional pipeline: one round trip per node for many single-key commands
        (a cluster pipeline splits them by slot), and one connection each, not one per key."""
        if self.cluster:
            return self._client.pipeline()
        return self._client.pipeline(transaction=False)

    # -- reads -------------------------------------------------------------------------------
    def get(self, key: bytes, timeout: float | None = None) -> tuple[bytes | None, str]:
        """The raw record of ``key`` (unverified), or (None, reason)."""
        started = time.monotonic()
        value, reason = self._call(lambda: self._client.get(self.key_name(key)), timeout)
        if reason is not None:
            if reason != BACKOFF_REASON:
                self._fault(reason, f"GET failed ({reason})")
            return None, reason
        if value is None:
            return None, "missing"
        self._metrics.observe("load_seconds", Tier.L3, time.monotonic() - started)
        return bytes(value), "ok"

    def exists_many(self, keys: list[bytes]) -> list[bool]:
        """Whether each key is present (one concurrent round of EXISTS); all False on a fault."""
        if not keys:
            return []

        async def probe() -> list[bool]:
            pipe = self._pipeline()
            for key in keys:
                pipe.exists(self.key_name(key))
            return [bool(c) for c in await pipe.execute()]

        result, reason = self._call(probe)
        if reason is not None or result is None:
            if reason != BACKOFF_REASON:
                self._fault(reason or "unavailable", f"EXISTS failed ({reason})")
            return [False] * len(keys)
        return result

    def children(self, parent: bytes) -> list[tuple[bytes, tuple[int, ...]]]:
        """The stored children of ``parent`` with their token ids (headers only)."""
        head_len = HEADER_SIZE + 4 * self._chunk_size

        async def listing() -> list[tuple[bytes, bytes | None]]:
            members = await self._client.lrange(self.children_name(parent), 0, _MAX_CHILDREN - 1)
            names = [m.decode() if isinstance(m, bytes) else str(m) for m in members]
            if not names:
                return []
            pipe = self._pipeline()
            for name in names:
                pipe.getrange(self._namespace + name, 0, head_len - 1)
            heads = await pipe.execute()
            return [(bytes.fromhex(n), h) for n, h in zip(names, heads, strict=True)]

        result, reason = self._call(listing)
        if reason is not None or result is None:
            if reason != BACKOFF_REASON:
                self._fault(reason or "unavailable", f"children lookup failed ({reason})")
            return []
        found: list[tuple[bytes, tuple[int, ...]]] = []
        for key, head in result:
            if not head:
                continue  # expired or evicted
            try:
                header = decode_header(head, self._digest, self._chunk_size)
                if header.key != key:
                    raise RecordError("bad_size", "record holds another key")
                found.append((key, header_tokens(head, header)))
            except RecordError as exc:
                reason = "bad_size" if exc.reason == "truncated" else exc.reason
                self._fault(reason, f"child {key.hex()}: {exc}")
        return found

    # -- writes ------------------------------------------------------------------------------
    def put(self, key: bytes, parent: bytes, record: bytes) -> bool:
        """Submit one write (returns at once). False when too many writes are in flight or the
        loop is gone (counted ``queue_full``)."""
        loop = self._loop
        if loop is None or not self._put_slots.acquire(timeout=self.timeout):
            self._fault("queue_full", "too many L3 writes in flight; dropped one")
            return False
        with self._lock:
            self._inflight += 1
        started = time.monotonic()

        async def write() -> None:
            px = None if self.ttl is None else max(1, int(self.ttl * 1000))
            await self._client.set(self.key_name(key), record, px=px)
            children, member = self.children_name(parent), key.hex()
            await self._client.lrem(children, 0, member)
            await self._client.lpush(children, member)
            await self._client.ltrim(children, 0, _MAX_CHILDREN - 1)
            if px is not None:
                await self._client.pexpire(children, px)

        future = asyncio.run_coroutine_threadsafe(self._bounded(write, self.timeout), loop)

        def done(fut: concurrent.futures.Future[None]) -> None:
            self._put_slots.release()
            exc = None if fut.cancelled() else fut.exception()
            if fut.cancelled() or exc is not None:
                reason = "unavailable" if exc is None else _reason_of(exc)
                self._fault(reason, f"SET failed ({reason}: {exc})")
            else:
                self._metrics.count("written_bytes", Tier.L3, len(record))
                self._metrics.observe("store_seconds", Tier.L3, time.monotonic() - started)
            with self._lock:
                self._inflight -= 1
                self._lock.notify_all()

        future.add_done_callback(done)
        return True

    def flush(self, timeout: float) -> bool:
        """Wait until every submitted write was answered (or failed)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._inflight:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._lock.wait(remaining)
        return True
