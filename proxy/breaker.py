"""A per-worker circuit breaker: closed -> open after N consecutive failures -> half-open trial.

Used only from the event loop thread (no locking). ``clock`` is injectable for tests.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

__all__ = ["CLOSED", "HALF_OPEN", "OPEN", "CircuitBreaker"]

CLOSED: Final = 0
OPEN: Final = 1
HALF_OPEN: Final = 2


class CircuitBreaker:
    """Opens after ``threshold`` consecutive failures; after ``cooldown`` s lets one trial through."""

    __slots__ = ("_clock", "_failures", "_opened_at", "_trial", "cooldown", "state", "threshold")

    def __init__(
        self, threshold: int, cooldown: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.threshold = max(1, threshold)
        self.cooldown = cooldown
        self._clock = clock
        self._failures = 0
        self._opened_at = 0.0
        self._trial = False
        self.state = CLOSED

    def available(self) -> bool:
        """May a request be sent now? Does not change state (safe to call for every candidate)."""
        if self.state == CLOSED:
            return True
        if self.state == OPEN:
            return self._clock() - self._opened_at >= self.cooldown
        return not self._trial

    def acquire(self) -> None:
        """The chosen worker is about to get a request; an elapsed OPEN becomes a HALF_OPEN trial."""
        if self.state == OPEN and self._clock() - self._opened_at >= self.cooldown:
            self.state = HALF_OPEN
        if self.state == HALF_OPEN:
            self._trial = True

    def record_success(self) -> None:
        self._failures = 0
        self._trial = False
        self.state = CLOSED

    def record_failure(self) -> None:
        self._trial = False
        self._failures += 1
        if self.state == HALF_OPEN or self._failures >= self.threshold:
            self.state = OPEN
            self._opened_at = self._clock()
