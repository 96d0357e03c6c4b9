"""The chunk store's settings, derived from the one config (:mod:`lmcache_disagg.config`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from lmcache_disagg.config import LMCacheDisaggConfig

__all__ = ["DEFAULT_DISK_SCAN_INTERVAL", "StoreSettings"]

# How often the disk tier re-reads the directory to count files written by other processes.
DEFAULT_DISK_SCAN_INTERVAL = 2.0


@dataclass(frozen=True, slots=True)
class StoreSettings:
    """Every knob of :class:`~lmcache_disagg.transfer.store.ChunkStore`. Sizes are bytes,
    durations seconds. A tier is on when its switch/location is set and its size is > 0."""

    local_cpu: bool = True
    max_local_cpu_size: int = 1 << 30
    l1_device: Literal["cpu", "pinned"] = "cpu"
    local_disk: Path | None = None
    max_local_disk_size: int = 10 << 30
    local_disk_fsync: Literal["never", "always"] = "never"
    disk_scan_interval: float = DEFAULT_DISK_SCAN_INTERVAL
    remote_url: str | None = None
    remote_cluster: bool = False
    remote_timeout: float = 0.5
    remote_max_connections: int = 16
    remote_ttl: float | None = None
    lease_ttl: float = 30.0
    write_queue: int = 256
    save_unfull_chunk: bool = True
    save_decode_cache: bool = False

    @property
    def l1_enabled(self) -> bool:
        return self.local_cpu and self.max_local_cpu_size > 0

    @property
    def l2_enabled(self) -> bool:
        return self.local_disk is not None and self.max_local_disk_size > 0

    @property
    def l3_enabled(self) -> bool:
        return bool(self.remote_url)

    @classmethod
    def from_config(cls, cfg: LMCacheDisaggConfig) -> StoreSettings:
        return cls(
            local_cpu=cfg.local_cpu,
            max_local_cpu_size=cfg.max_local_cpu_size,
            l1_device="cpu" if cfg.pool_device == "cpu" else "pinned",
            local_disk=Path(cfg.local_disk) if cfg.local_disk else None,
            max_local_disk_size=cfg.max_local_disk_size,
            local_disk_fsync=cfg.local_disk_fsync,
            remote_url=cfg.remote_url,
            remote_cluster=cfg.remote_cluster,
            remote_timeout=cfg.remote_timeout,
            remote_max_connections=cfg.remote_max_connections,
            remote_ttl=cfg.remote_ttl,
            lease_ttl=cfg.cache_lease_ttl,
            write_queue=cfg.cache_write_queue,
            save_unfull_chunk=cfg.save_unfull_chunk,
            save_decode_cache=cfg.save_decode_cache,
        )
