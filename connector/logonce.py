"""Log each failure reason once at WARNING, then at DEBUG (a dead D must not flood P's log)."""

from __future__ import annotations

import logging
import threading

__all__ = ["LogOnce"]


class LogOnce:
    """``warning(reason, fmt, *args)``: WARNING the first time ``reason`` is seen, DEBUG after."""

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def warning(self, reason: str, fmt: str, *args: object) -> None:
        with self._lock:
            first = reason not in self._seen
            self._seen.add(reason)
        if first:
            self._logger.warning(fmt + " (further %r failures are logged at DEBUG)", *args, reason)
        else:
            self._logger.debug(fmt, *args)
