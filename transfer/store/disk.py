"""L2: one file per chunk in a local directory, shared by every TP rank of the host.

* File ``<fingerprint digest hex>-<key hex>.kv`` holds one record (:mod:`.format`). A rank indexes
  only files of its own digest, but the size limit counts EVERY regular file in the directory
  (other ranks', other models', an earlier run's), evicting the oldest by mtime (reads touch it).
  Another process may delete any file at any time: a read of a vanished file is a miss.
* Writes go to ``.<name>.<pid>.tmp`` and are renamed into place (optionally fsynced first), so a
  reader never sees a partial file under the final name. Disk full (ENOSPC) and other I/O errors
  are counted faults; the chunk simply stays in the upper tier.
* :meth:`DiskTier.start` rebuilds the index from the files' headers (and token ids) only; a file
  that is short, of another layout or otherwise malformed is deleted and counted. Every read
  verifies the whole record (checksum); a bad file is deleted and counted too.
* KV events: the listener hears of every change to the index, so the published L2 key set is
  what a lookup can find here: ``stored`` for a finished write and for the chunks indexed at start
  (a restarted worker's disk is routable), ``evicted`` for an indexed chunk that leaves it (the
  size budget, a bad file, a file another process deleted). Files that are not in the index
  (another rank's or model's, a same-layout file this store never indexed) are never announced:
  they are not part of what this worker's fingerprint can serve.

Called from the store's writer thread (writes) and from callers' threads (reads); one lock guards
the index, never held across file I/O. The listener is called under that lock, so the order of
its calls is the order of the index changes; it only records (see :mod:`.listener`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lmcache_disagg.transfer.store.errors import RecordError
from lmcache_disagg.transfer.store.format import (
    HEADER_SIZE,
    Record,
    decode_header,
    header_tokens,
    verify_record,
)
from lmcache_disagg.transfer.store.listener import TIER_NAMES, NullStoreListener, StoreListener
from lmcache_disagg.transfer.store.metrics import StoreMetrics
from lmcache_disagg.transfer.store.tier import Tier

__all__ = ["DiskTier"]

logger = logging.getLogger(__name__)

_SUFFIX = ".kv"
_TMP_SUFFIX = ".tmp"
# A temp file younger than this is a write in progress and is not evicted.
_TMP_GRACE = 60.0
# Eviction frees 1/_HEADROOM of the limit beyond the bytes it needs.
_HEADROOM = 32
_TIER_NAME = TIER_NAMES[Tier.L2]


@dataclass(slots=True)
class _DiskEntry:
    size: int
    parent: bytes
    token_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class _DirFile:
    name: str
    size: int
    mtime: float


class DiskTier:
    def __init__(
        self,
        directory: Path,
        capacity_bytes: int,
        digest: bytes,
        chunk_size: int,
        bytes_per_token: int,
        metrics: StoreMetrics,
        fsync: bool = False,
        scan_interval: float = 2.0,
        listener: StoreListener | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.capacity_bytes = capacity_bytes
        self._digest = digest
        self._prefix = digest.hex() + "-"
        self._chunk_size = chunk_size
        self._bpt = bytes_per_token
        self._metrics = metrics
        self._fsync = fsync
        self._scan_interval = scan_interval
        self._listener: StoreListener = listener if listener is not None else NullStoreListener()
        self._lock = threading.Lock()
        self._index: dict[bytes, _DiskEntry] = {}
        self._children: dict[bytes, set[bytes]] = {}
        self._used = 0  # bytes of every file in the directory, as of the last scan + our writes
        self._last_scan = 0.0
        self._logged: set[str] = set()

    # -- names -------------------------------------------------------------------------------
    def path_of(self, key: bytes) -> Path:
        return self.directory / f"{self._prefix}{key.hex()}{_SUFFIX}"

    def _key_of(self, name: str) -> bytes | None:
        if not (name.startswith(self._prefix) and name.endswith(_SUFFIX)):
            return None
        try:
            key = bytes.fromhex(name[len(self._prefix) : -len(_SUFFIX)])
        except ValueError:
            return None
        return key if len(key) == 16 else None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Create the directory, rebuild the index from the files' headers, enforce the limit."""
        self.directory.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        files = self._scan()
        head_bytes = HEADER_SIZE + 4 * self._chunk_size
        found: list[tuple[bytes, _DiskEntry]] = []
        for item in files:
            if item.name.startswith(".") and item.name.endswith(_TMP_SUFFIX):
                self._remove_stale_temp(item.name)
                continue
            key = self._key_of(item.name)
            if key is None:
                continue  # another rank's or model's file: counted against the limit only
            path = self.directory / item.name
            try:
                with open(path, "rb") as handle:
                    head = handle.read(head_bytes)
                header = decode_header(head, self._digest, self._chunk_size)
                if header.key != key:
                    raise RecordError("foreign", "file name and record key differ")
                if header.payload_len != header.num_tokens * self._bpt:
                    raise RecordError("foreign", "payload length of another layout")
                if header.size != item.size:
                    raise RecordError(
                        "truncated", f"file of {item.size} bytes, header says {header.size}"
                    )
                tokens = header_tokens(head, header)
            except FileNotFoundError:
                continue
            except OSError as exc:
                self._fault("io_error", f"cannot read {path}: {exc}")
                continue
            except RecordError as exc:
                self._discard_path(path, key, exc.reason, str(exc))
                continue
            found.append((key, _DiskEntry(item.size, header.parent, tokens)))
        self._add(found)  # announced in one event: what a restarted worker can serve from disk
        with self._lock:
            self._used = sum(f.size for f in self._scan())
            self._last_scan = time.monotonic()
        self._make_room(0)
        logger.info(
            "L2 %s: %d chunks indexed, %d bytes in the directory, in %.3fs",
            self.directory,
            len(self._index),
            self._used,
            time.monotonic() - started,
        )
        self._publish()

    def _remove_stale_temp(self, name: str) -> None:
        """Delete our own temp file left by a dead process (``.<name>.<pid>.tmp``)."""
        if not name[1:].startswith(self._prefix):
            return
        pid_text = name[: -len(_TMP_SUFFIX)].rpartition(".")[2]
        if not pid_text.isdigit():
            return
        pid = int(pid_text)
        if pid != os.getpid():
            try:
                os.kill(pid, 0)
                return  # its writer is still alive
            except ProcessLookupError:
                pass
            except PermissionError:
                return
        try:
            os.unlink(self.directory / name)
            self._metrics.count("faults", Tier.L2, reason="truncated")
        except FileNotFoundError:
            pass

    # -- index -------------------------------------------------------------------------------
    def _add(self, entries: Sequence[tuple[bytes, _DiskEntry]]) -> None:
        """Index ``entries`` and announce them as stored in L2."""
        if not entries:
            return
        with self._lock:
            for key, entry in entries:
                self._index[key] = entry
                self._children.setdefault(entry.parent, set()).add(key)
            self._listener.stored([key for key, _ in entries], _TIER_NAME)

    def _forget(self, keys: Iterable[bytes]) -> None:
        """Drop ``keys`` from the index; those that were in it are announced as evicted from L2
        (a key never indexed was never announced, so it is not announced now either)."""
        with self._lock:
            gone: list[bytes] = []
            for key in keys:
                entry = self._index.pop(key, None)
                if entry is None:
                    continue
                gone.append(key)
                siblings = self._children.get(entry.parent)
                if siblings is not None:
                    siblings.discard(key)
                    if not siblings:
                        del self._children[entry.parent]
            if gone:
                self._listener.evicted(gone, _TIER_NAME)

    def contains(self, key: bytes) -> bool:
        with self._lock:
            return key in self._index

    def tokens_of(self, key: bytes) -> tuple[int, ...] | None:
        with self._lock:
            entry = self._index.get(key)
            return None if entry is None else entry.token_ids

    def children(self, parent: bytes) -> list[tuple[bytes, tuple[int, ...]]]:
        with self._lock:
            return [(k, self._index[k].token_ids) for k in self._children.get(parent, ())]

    @property
    def chunks(self) -> int:
        with self._lock:
            return len(self._index)

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return self._used

    # -- reads -------------------------------------------------------------------------------
    def load(self, key: bytes) -> Record:
        """The verified record of ``key``. RecordError (``missing``, ``truncated``,
        ``checksum``, ``foreign``, ``bad_size``, ``io_error``) otherwise; a bad file is deleted."""
        if not self.contains(key):
            raise RecordError("missing", "not in L2")
        path = self.path_of(key)
        started = time.monotonic()
        try:
            with open(path, "rb") as handle:
                record = handle.read()
        except FileNotFoundError:
            self._forget([key])
            raise RecordError("missing", f"{path.name} was deleted") from None
        except OSError as exc:
            self._fault("io_error", f"cannot read {path}: {exc}")
            raise RecordError("io_error", str(exc)) from exc
        try:
            verified = verify_record(record, self._digest, self._chunk_size, self._bpt, key=key)
        except RecordError as exc:
            self._discard_path(path, key, exc.reason, str(exc))
            raise
        with contextlib.suppress(OSError):
            os.utime(path)  # recently used: the last to be evicted by age
        self._metrics.observe("load_seconds", Tier.L2, time.monotonic() - started)
        return verified

    def _discard_path(self, path: Path, key: bytes | None, reason: str, message: str) -> None:
        if key is not None:
            self._forget([key])
        try:
            size = path.stat().st_size
            os.unlink(path)
            with self._lock:
                self._used = max(0, self._used - size)
        except OSError:
            pass
        self._fault(reason, f"{path.name}: {message}; deleted")
        self._publish()

    # -- writes ------------------------------------------------------------------------------
    def write(self, key: bytes, parent: bytes, tokens: tuple[int, ...], record: bytes) -> bool:
        """Write one record (writer thread). False when it was not written (counted)."""
        if self.contains(key):
            return True
        size = len(record)
        if size > self.capacity_bytes:
            self._fault("too_large", f"a {size}-byte record exceeds max_local_disk_size")
            return False
        self._make_room(size)
        final = self.path_of(key)
        temp = self.directory / f".{final.name}.{os.getpid()}{_TMP_SUFFIX}"
        started = time.monotonic()
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                view = memoryview(record)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                if self._fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temp, final)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                self._fault("disk_full", f"disk full writing {final.name}: {exc.strerror}")
            else:
                self._fault("io_error", f"cannot write {final.name}: {exc}")
            return False
        self._add([(key, _DiskEntry(size, parent, tokens))])
        with self._lock:
            self._used += size
        self._metrics.count("written_bytes", Tier.L2, size)
        self._metrics.observe("store_seconds", Tier.L2, time.monotonic() - started)
        self._publish()
        return True

    def _scan(self) -> list[_DirFile]:
        files: list[_DirFile] = []
        try:
            with os.scandir(self.directory) as it:
                for item in it:
                    try:
                        if item.is_file(follow_symlinks=False):
                            stat = item.stat(follow_symlinks=False)
                            files.append(_DirFile(item.name, stat.st_size, stat.st_mtime))
                    except FileNotFoundError:
                        continue
        except OSError as exc:
            self._fault("io_error", f"cannot list {self.directory}: {exc}")
        return files

    def _rescan(self) -> None:
        """Recount the directory and forget our files that another process deleted."""
        files = self._scan()
        present = {f.name for f in files}
        with self._lock:
            gone = [k for k in self._index if self.path_of(k).name not in present]
        self._forget(gone)  # e.g. evicted by another rank's share of the size budget
        with self._lock:
            self._used = sum(f.size for f in files)
            self._last_scan = time.monotonic()

    def _make_room(self, need: int) -> None:
        """Evict the oldest files of the directory (anyone's) until ``need`` more bytes fit."""
        now = time.monotonic()
        with self._lock:
            rescan = now - self._last_scan >= self._scan_interval
        if rescan:
            self._rescan()
        with self._lock:
            if self._used + need <= self.capacity_bytes:
                return
        files = sorted(self._scan(), key=lambda f: f.mtime)
        used = sum(f.size for f in files)
        evicted = 0
        ours: list[bytes] = []
        # Free a little more than needed, so a full directory is not rescanned on every write.
        need = min(self.capacity_bytes, need + self.capacity_bytes // _HEADROOM)
        young = time.time() - _TMP_GRACE
        for item in files:
            if used + need <= self.capacity_bytes:
                break
            if item.name.endswith(_TMP_SUFFIX) and item.mtime > young:
                continue  # a write in progress (ours or another rank's)
            try:
                os.unlink(self.directory / item.name)
            except FileNotFoundError:
                pass
            except OSError as exc:
                self._fault("io_error", f"cannot evict {item.name}: {exc}")
                continue
            used -= item.size
            key = self._key_of(item.name)
            if key is not None:
                ours.append(key)
            evicted += 1
        self._forget(ours)  # announced only for what this store indexed (and so announced)
        with self._lock:
            self._used = used
            self._last_scan = time.monotonic()
        if evicted:
            self._metrics.count("evictions", Tier.L2, evicted)

    # -- metrics -----------------------------------------------------------------------------
    def _fault(self, reason: str, message: str) -> None:
        self._metrics.count("faults", Tier.L2, reason=reason)
        with self._lock:
            first = reason not in self._logged
            self._logged.add(reason)
        if first:
            logger.warning(
                "L2 fault (%s): %s (further %s faults are only counted)", reason, message, reason
            )
        else:
            logger.debug("L2 fault (%s): %s", reason, message)

    def _publish(self) -> None:
        with self._lock:
            used, chunks = self._used, len(self._index)
        self._metrics.gauge("used_bytes", Tier.L2, used)
        self._metrics.gauge("capacity_bytes", Tier.L2, self.capacity_bytes)
        self._metrics.gauge("chunks", Tier.L2, chunks)
