"""Where the gather/scatter copies run, and how the connector learns they are done.

On the CPU a copy is synchronous: :meth:`CopyEngine.submit` runs it and returns a completed
:class:`Completion`. On CUDA the copy runs on a side stream, ordered after the work already queued
on the compute stream (so a gather sees the KV the forward just wrote), and an event is recorded
after it. The connector hands a staged page to the transfer layer, or reports a load finished, only
once that event has completed (:meth:`Completion.done`): NIXL/TCP never read a page the gather is
still writing, and vLLM never computes on blocks the scatter is still filling.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

__all__ = [
    "DONE",
    "Completion",
    "CopyEngine",
    "CudaCopyEngine",
    "SyncCopyEngine",
    "make_copy_engine",
]


class Completion(Protocol):
    def done(self) -> bool:
        """Non-blocking: has the copy finished?"""
        ...

    def wait(self) -> None:
        """Block until the copy finished (shutdown and cancellation only)."""
        ...


class _Done:
    def done(self) -> bool:
        return True

    def wait(self) -> None:
        return None


DONE: Completion = _Done()


class _EventCompletion:
    def __init__(self, event: torch.cuda.Event) -> None:
        self._event = event

    def done(self) -> bool:
        return bool(self._event.query())

    def wait(self) -> None:
        self._event.synchronize()


class CopyEngine(Protocol):
    def submit(self, copy: Callable[[], None]) -> Completion:
        """Run ``copy`` (a gather or scatter) and return how to tell when it has finished."""
        ...

    def fence_compute(self, completion: Completion) -> None:
        """Make later compute-stream work wait for ``completion`` (blocks about to be freed)."""
        ...


class SyncCopyEngine:
    """CPU: copies run inline on the calling thread."""

    def submit(self, copy: Callable[[], None]) -> Completion:
        copy()
        return DONE

    def fence_compute(self, completion: Completion) -> None:
        return None


class CudaCopyEngine:
    """CUDA: copies on one side stream per worker, each followed by an event."""

    def __init__(self, device: torch.device) -> None:
        self._device = device
        self._stream = torch.cuda.Stream(device=device)

    def submit(self, copy: Callable[[], None]) -> Completion:
        compute = torch.cuda.current_stream(self._device)
        self._stream.wait_stream(compute)
        with torch.cuda.stream(self._stream):
            copy()
            event = torch.cuda.Event()
            event.record(self._stream)
        return _EventCompletion(event)

    def fence_compute(self, completion: Completion) -> None:
        if isinstance(completion, _EventCompletion):
            torch.cuda.current_stream(self._device).wait_event(completion._event)


def make_copy_engine(device: torch.device) -> CopyEngine:
    """The engine for KV caches on ``device``."""
    if device.type == "cuda":
        return CudaCopyEngine(device)
    return SyncCopyEngine()
