"""Scheduler-side cache lookups answered by the workers (one ZMQ REQ/REP pair per TP rank).

vLLM asks :meth:`get_num_new_matched_tokens` in the scheduler, but each TP rank's chunk store
lives in its worker (a separate process with TP > 1, the same process with one rank). One code
path serves both: each worker runs a :class:`LookupServer` thread on ``ipc://`` and the scheduler's
:class:`LookupClient` asks every rank and takes the minimum. A round trip costs well under a
millisecond; every call has a deadline (:data:`LOOKUP_TIMEOUT`, plus the remote tier's timeout when
one is configured), after which the answer is 0 (recompute) and the socket is rebuilt.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import zmq

from lmcache_disagg.config import LMCacheDisaggConfig
from lmcache_disagg.connector.protocol import (
    PROTOCOL_VERSION,
    LookupReply,
    LookupRequest,
    decode_reply,
    decode_request,
    encode,
)

__all__ = [
    "LOOKUP_TIMEOUT",
    "LookupAnswer",
    "LookupClient",
    "LookupResult",
    "LookupServer",
    "lookup_address",
    "lookup_timeout",
]

logger = logging.getLogger(__name__)

LOOKUP_TIMEOUT = 0.25
"""Seconds a lookup may take when only local tiers are on (RAM and disk index are in memory)."""
_POLL_MS = 100


@dataclass(frozen=True)
class LookupAnswer:
    """One rank's answer: ``num_tokens`` held, and per hit chunk (tier, tokens used)."""

    num_tokens: int
    spans: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class LookupResult:
    """The scheduler's view: the minimum over ranks, an error label (empty when none), and
    rank 0's spans (where the tokens come from, for vLLM's per-source metrics)."""

    num_tokens: int
    error: str = ""
    spans: tuple[tuple[str, int], ...] = ()


def lookup_timeout(config: LMCacheDisaggConfig) -> float:
    """A lookup's deadline: the local tiers, plus one remote round trip when L3 is on."""
    return LOOKUP_TIMEOUT + (config.remote_timeout if config.remote_url else 0.0)


def lookup_address(engine_id: str, tp_rank: int) -> str:
    """The ``ipc://`` endpoint of one engine's rank (engine ids are unique per vLLM instance)."""
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in engine_id)[:64]
    return f"ipc://{os.path.join(tempfile.gettempdir(), f'lmcd-lookup-{safe}-r{tp_rank}.ipc')}"


class LookupServer:
    """A worker thread that answers lookups with ``answer(request) -> LookupAnswer``."""

    def __init__(self, address: str, answer: Callable[[LookupRequest], LookupAnswer]) -> None:
        self.address = address
        self._answer = answer
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 5.0) -> None:
        self._thread = threading.Thread(target=self._run, name="lmcd-cache-lookup", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError(f"lookup server on {self.address} did not start")
        if self._error is not None:
            raise RuntimeError(f"lookup server on {self.address}: {self._error}")

    def _run(self) -> None:
        context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        sock = context.socket(zmq.REP)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            path = self.address.removeprefix("ipc://")
            if os.path.exists(path):
                os.unlink(path)  # left by a crashed worker of an earlier engine with this id
            sock.bind(self.address)
        except (zmq.ZMQError, OSError) as exc:
            self._error = exc
            self._ready.set()
            sock.close()
            return
        self._ready.set()
        try:
            while not self._stop.is_set():
                if not sock.poll(_POLL_MS, zmq.POLLIN):
                    continue
                data = sock.recv()
                sock.send(encode(self._handle(data)))
        finally:
            sock.close()

    def _handle(self, data: bytes) -> LookupReply:
        try:
            request = decode_request(data)
        except ValueError as exc:
            return LookupReply(PROTOCOL_VERSION, 0, str(exc)[:200])
        try:
            answer = self._answer(request)
            return LookupReply(
                PROTOCOL_VERSION,
                max(0, int(answer.num_tokens)),
                span_tiers=[tier for tier, _ in answer.spans],
                span_tokens=[n for _, n in answer.spans],
            )
        except Exception as exc:  # a store bug must cost a recompute, not the engine
            logger.warning("lmcache-disagg cache lookup failed: %r", exc)
            return LookupReply(PROTOCOL_VERSION, 0, repr(exc)[:200])

    def shutdown(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        path = self.address.removeprefix("ipc://")
        with contextlib.suppress(OSError):
            os.unlink(path)


class LookupClient:
    """The scheduler's side: ask every rank, answer the minimum, 0 on any failure or timeout."""

    def __init__(self, addresses: list[str], timeout: float) -> None:
        self._addresses = addresses
        self._timeout = timeout
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._socks: list[zmq.Socket[bytes] | None] = [None] * len(addresses)
        self.failures = 0

    def _sock(self, rank: int) -> zmq.Socket[bytes]:
        sock = self._socks[rank]
        if sock is None:
            sock = self._context.socket(zmq.REQ)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(self._addresses[rank])
            self._socks[rank] = sock
        return sock

    def _drop(self, rank: int) -> None:
        sock = self._socks[rank]
        if sock is not None:
            sock.close(linger=0)
            self._socks[rank] = None

    def lookup(self, request: LookupRequest) -> LookupResult:
        """The minimum over ranks; 0 and the reason on any failure or timeout."""
        payload = encode(request)
        deadline = time.monotonic() + self._timeout
        sent: list[int] = []
        for rank in range(len(self._addresses)):
            try:
                self._sock(rank).send(payload, zmq.NOBLOCK)
                sent.append(rank)
            except zmq.ZMQError:
                for other in (*sent, rank):
                    self._drop(other)
                self.failures += 1
                return LookupResult(0, "unavailable")
        best: int | None = None
        spans: tuple[tuple[str, int], ...] = ()
        error = ""
        for rank in sent:
            sock = self._sock(rank)
            remaining_ms = max(0, int((deadline - time.monotonic()) * 1000))
            if not sock.poll(remaining_ms, zmq.POLLIN):
                self._drop(rank)
                error = error or "timeout"
                continue
            try:
                reply = decode_reply(sock.recv())
            except ValueError as exc:
                self._drop(rank)
                error = error or str(exc)[:100]
                continue
            if reply.error:
                error = error or "worker_error"
            if best is None:
                spans = tuple(zip(reply.span_tiers, reply.span_tokens, strict=True))
            best = reply.num_tokens if best is None else min(best, reply.num_tokens)
        if error:
            self.failures += 1
            return LookupResult(0, error)
        return LookupResult(best or 0, "", spans)

    def close(self) -> None:
        for rank in range(len(self._socks)):
            self._drop(rank)
