"""The worker list shared by the processes of one ``--workers N`` proxy (a small JSON file).

With several processes behind one port, a ``/workers`` change lands in one of them. That process
writes the full list to the state file (atomic rename); every process re-reads the file when its
mtime changes, on each health round, so all converge within one health interval. A process also
re-reads the file right before applying an admin change, so concurrent changes through different
processes are rarely lost (last writer wins on a true race; the admin API is low-rate).

Single-process proxies have no state file. Called only from the event loop; the file is tiny.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path

import orjson

from lmcache_disagg.errors import ConfigError
from lmcache_disagg.proxy.settings import WorkerSpec, parse_worker_spec
from lmcache_disagg.proxy.workers import Worker, WorkerPool

__all__ = ["SharedWorkerList"]

_MAX_BYTES = 1 << 20


class SharedWorkerList:
    """Keeps a :class:`WorkerPool` in sync with the state file at ``path``."""

    def __init__(self, path: str | Path, pool: WorkerPool) -> None:
        self._path = Path(path)
        self._pool = pool
        self._seen: int | None = None

    def load(self) -> list[Worker]:
        """Apply the file if it changed; returns the workers that were added (to probe them)."""
        try:
            stat = self._path.stat()
        except FileNotFoundError:
            return []
        if stat.st_mtime_ns == self._seen or stat.st_size > _MAX_BYTES:
            return []
        try:
            entries = orjson.loads(self._path.read_bytes())
            specs = [
                dataclasses.replace(
                    parse_worker_spec(
                        e["role"], e["http"] + (f",kv={e['kv']}" if e.get("kv") else "")
                    ),
                    events=_optional_str(e.get("events")),
                )
                for e in entries
            ]
        except (OSError, orjson.JSONDecodeError, KeyError, TypeError, ValueError, ConfigError):
            return []  # a torn or foreign file: keep the current list, retry next round
        self._seen = stat.st_mtime_ns
        return self._reconcile(specs)

    def _reconcile(self, specs: list[WorkerSpec]) -> list[Worker]:
        wanted = {(s.role, s.http) for s in specs}
        for worker in list(self._pool):
            if (worker.role, worker.http) not in wanted:
                self._pool.remove(worker.role, worker.http)
        known = {(w.role, w.http) for w in self._pool}
        return [self._pool.add(s) for s in specs if (s.role, s.http) not in known]

    def save(self) -> None:
        """Write this process's list (after an admin change)."""
        entries = [
            {
                "role": w.role,
                "http": w.http,
                "kv": w.kv if w.role == "decode" else None,
                "events": w.events,
            }
            for w in self._pool
        ]
        tmp = self._path.with_name(f"{self._path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(orjson.dumps(entries))
        os.replace(tmp, self._path)
        with contextlib.suppress(OSError):
            self._seen = self._path.stat().st_mtime_ns


def _optional_str(value: object) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise TypeError(f"expected a string, got {type(value).__name__}")
