"""P side: gather each finished prompt chunk out of vLLM's paged KV and push it to D.

Chunk-wise, after each forward: the scheduler tells the worker, per step, how far each push
request's prompt has been computed (``PushProgress``); in ``wait_for_save`` (after the forward) the
:class:`Pusher` gathers every chunk that is now complete - including the partial last chunk once the
whole pushed range is computed - into a staging page and hands it to the transfer layer, which sends
it in the background while the next prefill step computes. With chunked prefill this naturally
pushes the early chunks while the later ones are still being computed.

Threads: everything here runs on the worker's engine thread, except ``sender.open`` (a handshake
and one reservation round trip), which runs on the named ``lmcd-push-open`` thread so a slow or
dead D never stalls a forward.

Block lifetime: P's scheduler keeps a finished request's blocks (``request_finished`` returns True)
until :meth:`Pusher.take_finished` reports it - once every chunk was gathered and the push settled
(D acknowledged, failed, or ``push_deadline`` passed). Gathers happen only while the blocks are
known to hold the request's KV (progress of the current step; never after a preemption or
cancellation).
"""

from __future__ import annotations

import enum
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from lmcache_disagg.config import LMCacheDisaggConfig
from lmcache_disagg.connector.checksum import log_checksum
from lmcache_disagg.connector.device import Completion, CopyEngine
from lmcache_disagg.connector.keys import chain_root, chunk_keys, chunk_spans
from lmcache_disagg.connector.kvcache import WorkerKV, target_for_rank
from lmcache_disagg.connector.logonce import LogOnce
from lmcache_disagg.connector.metadata import LMCacheDisaggMetadata, PushProgress, PushStart
from lmcache_disagg.connector.stats import StatsRecorder
from lmcache_disagg.kernels import chunk_view, gather
from lmcache_disagg.transfer.errors import DeadlineExceeded, TransferError
from lmcache_disagg.transfer.pool import SendPage
from lmcache_disagg.transfer.state import PushState, PushStatus

__all__ = ["MAX_PENDING_OPENS", "Pusher", "SenderLike"]

logger = logging.getLogger(__name__)

MAX_PENDING_OPENS = 4096
_OPEN_POLL = 0.1


class HandleLike(Protocol):
    held: int
    """Leading chunks D already holds: not gathered, not written."""

    def write(
        self, index: int, page: SendPage, nbytes: int, num_tokens: int, key: bytes
    ) -> None: ...

    def finish(self) -> None: ...

    def cancel(self) -> None: ...

    def status(self) -> PushStatus: ...


class SenderLike(Protocol):
    """What the pusher needs from :class:`lmcache_disagg.transfer.KVSender`."""

    def open(
        self, target: str, transfer_id: str, n_chunks: int, keys: Sequence[bytes] = ()
    ) -> HandleLike: ...

    def acquire_page(self, timeout: float) -> SendPage: ...

    def release_page(self, page: SendPage) -> None: ...


@dataclass(eq=False)
class _Staged:
    index: int
    page: SendPage
    nbytes: int
    num_tokens: int
    completion: Completion
    keep: torch.Tensor | None = None


class PushPhase(enum.Enum):
    """Where a push is in its life. A failure (``_Push.failed``) can happen in any phase."""

    OPENING = "OPENING"
    """Queued for the opener thread (handshake + reservation)."""
    OPEN = "OPEN"
    """The opener is done (``handle`` or ``open_error`` set): gathering and writing chunks."""
    SEALED = "SEALED"
    """Every chunk was handed over and ``finish()`` called: waiting for D's verdict."""
    SETTLED = "SETTLED"
    """D acknowledged every chunk and the outcome was recorded."""
    CANCELLED = "CANCELLED"
    """The scheduler aborted the request (or the pusher shut down)."""


@dataclass(eq=False)
class _Push:
    req_id: str
    transfer_id: str
    target: str
    keys: list[bytes]
    spans: list[tuple[int, int]]
    deadline: float
    started: float
    # Set by the opener thread (under Pusher._lock), as is the OPENING -> OPEN transition.
    handle: HandleLike | None = None
    open_error: str | None = None
    phase: PushPhase = PushPhase.OPENING
    # Engine thread only.
    block_ids: list[int] = field(default_factory=list)
    ready_end: int = 0
    next_chunk: int = 0
    staged: deque[_Staged] = field(default_factory=deque)
    written: int = 0
    bytes: int = 0
    first_write: float = 0.0
    finished_requested: bool = False
    """The scheduler handed the request's blocks over (``push_finished``)."""
    failed: str | None = None

    @property
    def n_chunks(self) -> int:
        return len(self.spans)


class Pusher:
    """All pushes of one P worker (one TP rank). Engine-thread API, plus the opener thread."""

    def __init__(
        self,
        config: LMCacheDisaggConfig,
        kv: WorkerKV,
        sender: SenderLike,
        copy_engine: CopyEngine,
        stats: StatsRecorder,
        log: LogOnce,
    ) -> None:
        self._config = config
        self._kv = kv
        self._sender = sender
        self._copy = copy_engine
        self._stats = stats
        self._log = log
        self._root = chain_root(kv.fingerprint)
        self._pushes: dict[str, _Push] = {}
        self._ready_to_report: set[str] = set()
        self._lock = threading.Lock()
        self._opens: queue.Queue[_Push] = queue.Queue(maxsize=MAX_PENDING_OPENS)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.verify = False
        """Log an xxh3 of every gathered chunk (``LMCACHE_DISAGG_VERIFY_KV=1``, tests only)."""

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._open_loop, name="lmcd-push-open", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        """Cancel every push and join the opener thread. Idempotent."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        for push in list(self._pushes.values()):
            self._cancel(push, "shutdown")
        self._pushes.clear()

    @property
    def pending(self) -> int:
        return len(self._pushes)

    # -- engine-thread API -----------------------------------------------------------------------

    def on_metadata(self, meta: LMCacheDisaggMetadata) -> None:
        """Apply this step's scheduler decisions (called before the forward)."""
        for start in meta.push_starts:
            self._start(start)
        for progress in meta.push_progress:
            self._progress(progress)
        for req_id in meta.push_cancelled:
            push = self._pushes.pop(req_id, None)
            if push is not None:
                self._cancel(push, "aborted")
        for req_id in meta.push_finished:
            push = self._pushes.get(req_id)
            if push is None:
                self._ready_to_report.add(req_id)
            else:
                push.finished_requested = True

    def after_forward(self) -> None:
        """Gather what the forward completed and hand finished gathers to the sender."""
        for push in list(self._pushes.values()):
            self._pump(push)

    def take_finished(self) -> set[str]:
        """Requests whose blocks may be freed now (their push settled); called once per step."""
        now = time.monotonic()
        done = self._ready_to_report
        self._ready_to_report = set()
        for req_id, push in list(self._pushes.items()):
            self._pump(push)
            # A settled push whose request still runs keeps its entry until the scheduler hands
            # the blocks over (push_finished) or cancels it.
            if self._settled(push, now) and push.finished_requested:
                del self._pushes[req_id]
                done.add(req_id)
        self._stats.gauge("pending_pushes", len(self._pushes))
        return done

    def wants_time(self) -> bool:
        """True when a push is waiting on the network only (the engine may idle briefly)."""
        return any(not p.failed and p.handle is not None for p in self._pushes.values())

    # -- internals -------------------------------------------------------------------------------

    def _start(self, start: PushStart) -> None:
        if start.req_id in self._pushes:
            return
        now = time.monotonic()
        chunk = self._kv.fingerprint.chunk_size
        try:
            target = target_for_rank(start.target, self._kv.fingerprint.tp_rank)
            keys = chunk_keys(self._root, start.token_ids, chunk)
        except ValueError as exc:
            self._fail_count("bad_params", f"push {start.transfer_id} not started: {exc}")
            return
        push = _Push(
            req_id=start.req_id,
            transfer_id=start.transfer_id,
            target=target,
            keys=keys,
            spans=chunk_spans(len(start.token_ids), chunk),
            deadline=now + self._config.push_deadline,
            started=now,
        )
        if push.n_chunks == 0:
            return
        self._pushes[start.req_id] = push
        try:
            self._opens.put_nowait(push)
        except queue.Full:
            push.failed = "open_queue_full"
            push.phase = PushPhase.OPEN
            self._fail_count("open_queue_full", "too many pushes waiting for a reservation")

    def _progress(self, progress: PushProgress) -> None:
        push = self._pushes.get(progress.req_id)
        if push is None:
            return
        push.block_ids = progress.block_ids
        push.ready_end = progress.computed_end

    def _open_loop(self) -> None:
        while not self._stop.is_set():
            try:
                push = self._opens.get(timeout=_OPEN_POLL)
            except queue.Empty:
                continue
            handle: HandleLike | None = None
            error: str | None = None
            message = ""
            try:
                if time.monotonic() > push.deadline:
                    raise DeadlineExceeded("push deadline passed before the reservation")
                handle = self._sender.open(push.target, push.transfer_id, push.n_chunks, push.keys)
            except TransferError as exc:
                error, message = exc.reason, str(exc)
            except Exception as exc:  # a bug or an unexpected library error: never kill P
                error, message = "open_error", repr(exc)
            with self._lock:
                push.handle = handle
                push.open_error = error
                if push.phase is PushPhase.OPENING:
                    push.phase = PushPhase.OPEN
                cancelled = push.phase is PushPhase.CANCELLED
            if handle is not None and cancelled:
                handle.cancel()
            if error is not None:
                self._fail_count(error, f"push {push.transfer_id} to {push.target}: {message}")

    def _pump(self, push: _Push) -> None:
        with self._lock:
            if push.phase in (PushPhase.OPENING, PushPhase.CANCELLED):
                return
            handle, error = push.handle, push.open_error
        if error is not None:
            push.failed = push.failed or error
        if push.failed or handle is None:
            self._drop_staged(push)
            return
        # Gather every chunk the computed range now covers, handing each to the sender as soon
        # as its copy has completed (at once on the CPU), so sending overlaps the next gathers.
        if push.next_chunk == 0 and handle.held > 0:
            # D holds the leading chunks already: they are neither gathered nor sent.
            push.next_chunk = push.written = handle.held
        if not self._write_ready(push, handle):
            return
        while push.next_chunk < push.n_chunks:
            start, end = push.spans[push.next_chunk]
            if end > push.ready_end or not push.block_ids:
                break
            try:
                page = self._sender.acquire_page(timeout=0)
            except DeadlineExceeded:
                break  # staging full: retry next step (the blocks stay held)
            gathered = self._gather(push, push.next_chunk, start, end, page)
            if gathered is None:
                return
            push.staged.append(gathered)
            push.next_chunk += 1
            if not self._write_ready(push, handle):
                return
        # Everything handed over: seal the push so D can verify and complete it.
        if push.phase is PushPhase.OPEN and push.written == push.n_chunks and not push.staged:
            push.phase = PushPhase.SEALED
            try:
                handle.finish()
            except (TransferError, ValueError) as exc:
                self._mark_failed(push, "finish_error", str(exc))
            self._stats.count("tokens_pushed", push.spans[-1][1])

    def _write_ready(self, push: _Push, handle: HandleLike) -> bool:
        """Send the staged chunks whose copy completed, in index order; False if the push failed."""
        while push.staged and push.staged[0].completion.done():
            staged = push.staged.popleft()
            if self.verify:
                log_checksum("P", push.transfer_id, staged.index, staged.page.data[: staged.nbytes])
            if not push.first_write:
                push.first_write = time.monotonic()
            try:
                handle.write(
                    staged.index,
                    staged.page,
                    staged.nbytes,
                    staged.num_tokens,
                    push.keys[staged.index],
                )
            except (TransferError, ValueError) as exc:
                self._mark_failed(push, "write_error", str(exc))
                self._drop_staged(push)
                return False
            push.written += 1
            push.bytes += staged.nbytes
        return True

    def _gather(
        self, push: _Push, index: int, start: int, end: int, page: SendPage
    ) -> _Staged | None:
        kv = self._kv
        num_tokens = end - start
        try:
            out = chunk_view(page.data, kv.layout, len(kv.caches), num_tokens)
            block_ids = torch.as_tensor(push.block_ids, dtype=torch.int64)
            if out.device == kv.device:
                completion = self._copy.submit(
                    lambda: gather(kv.caches, kv.layout, block_ids, start, end, out)
                )
                keep: torch.Tensor | None = None
            else:
                # GPU caches, host (pinned) staging page: gather on the device, then download,
                # both on the copy stream; ``keep`` holds the device buffer until the event.
                keep = torch.empty(out.shape, dtype=out.dtype, device=kv.device)
                device_out = keep

                def copy() -> None:
                    gather(kv.caches, kv.layout, block_ids, start, end, device_out)
                    out.copy_(device_out, non_blocking=True)

                completion = self._copy.submit(copy)
        except Exception as exc:  # a layout bug must not take P down: fail this push only
            self._sender.release_page(page)
            self._mark_failed(push, "gather_error", repr(exc))
            return None
        nbytes = kv.layout.chunk_bytes(len(kv.caches), num_tokens)
        return _Staged(index, page, nbytes, num_tokens, completion, keep)

    def _settled(self, push: _Push, now: float) -> bool:
        """Nothing more will read this push's blocks or pages (and its outcome is recorded)."""
        status = PushStatus(PushState.PENDING)
        sealed = push.phase in (PushPhase.SEALED, PushPhase.SETTLED)
        if push.failed is None and sealed and push.handle is not None:
            status = push.handle.status()
        if status.state is PushState.PENDING and push.failed is None and now > push.deadline:
            self._mark_failed(push, "deadline", f"push {push.transfer_id} passed push_deadline")
        if push.failed is not None:
            self._drop_staged(push)
            return not push.staged
        if status.state is PushState.PENDING:
            return False
        if status.state is PushState.FAILED:
            self._mark_failed(push, status.reason or "push_failed", f"D refused: {status.reason}")
            return True
        if push.phase is PushPhase.SEALED:
            push.phase = PushPhase.SETTLED
            elapsed = max(time.monotonic() - (push.first_write or push.started), 1e-6)
            self._stats.count("pushes")
            self._stats.count("bytes_sent", push.bytes)
            self._stats.observe("transfer_gbps", push.bytes / elapsed / 1e9)
        return True

    def _mark_failed(self, push: _Push, reason: str, message: str) -> None:
        if push.failed is not None:
            return
        push.failed = reason
        if push.handle is not None:
            push.handle.cancel()
        self._fail_count(reason, f"push {push.transfer_id}: {message}")

    def _fail_count(self, reason: str, message: str) -> None:
        self._stats.count("push_failures", reason=reason)
        self._log.warning(reason, "KV push failed (%s), D will recompute: %s", reason, message)

    def _drop_staged(self, push: _Push) -> None:
        while push.staged:
            staged = push.staged.popleft()
            # The gather may still be writing the page on a GPU: wait before reusing it.
            staged.completion.wait()
            self._sender.release_page(staged.page)

    def _cancel(self, push: _Push, reason: str) -> None:
        with self._lock:
            push.phase = PushPhase.CANCELLED
            handle = push.handle
        for staged in push.staged:
            self._copy.fence_compute(staged.completion)
        self._drop_staged(push)
        if handle is not None and push.failed is None:
            handle.cancel()
        if push.failed is None:
            push.failed = reason
            self._stats.count("push_failures", reason=reason)
