"""The cache config keys (LMCache's names and meanings) and StoreSettings.from_config."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmcache_disagg.config import load_config, parse_gb_size
from lmcache_disagg.errors import ConfigError
from lmcache_disagg.transfer.store import StoreSettings

GIB = 1024**3


def test_defaults() -> None:
    cfg = load_config(environ={})
    assert cfg.local_cpu is True
    assert cfg.max_local_cpu_size == GIB
    assert cfg.local_disk is None
    assert cfg.max_local_disk_size == 10 * GIB
    assert cfg.remote_url is None
    assert cfg.save_decode_cache is False and cfg.save_unfull_chunk is True
    assert cfg.local_disk_fsync == "never"
    assert cfg.remote_timeout == 0.5 and cfg.remote_max_connections == 16
    assert cfg.remote_ttl is None and cfg.remote_cluster is False
    assert cfg.cache_lease_ttl == 30.0 and cfg.cache_write_queue == 256


@pytest.mark.parametrize(
    ("value", "expected"),
    [(2, 2 * GIB), ("2", 2 * GIB), (0.5, GIB // 2), ("4GiB", 4 * GIB), ("512MiB", 512 << 20),
     ("1GB", 10**9), (0, 0)],
)  # fmt: skip
def test_a_bare_number_is_gb_as_lmcache_means_it(value: object, expected: int) -> None:
    assert parse_gb_size(value) == expected
    cfg = load_config(
        overrides={"max_local_cpu_size": value, "max_local_disk_size": value}, environ={}
    )
    assert cfg.max_local_cpu_size == expected and cfg.max_local_disk_size == expected


def test_yaml_file_with_lmcache_keys(tmp_path: Path) -> None:
    path = tmp_path / "lmcache.yaml"
    path.write_text(
        "chunk_size: 256\nlocal_cpu: true\nmax_local_cpu_size: 5.0\n"
        "local_disk: file:///var/cache/kv\nmax_local_disk_size: 20\n"
        "remote_url: redis://cache:6379\nsave_unfull_chunk: false\nremote_ttl: 10m\n"
    )
    cfg = load_config(path, environ={})
    assert cfg.max_local_cpu_size == 5 * GIB
    assert cfg.local_disk == "/var/cache/kv"
    assert cfg.max_local_disk_size == 20 * GIB
    assert cfg.remote_url == "redis://cache:6379"
    assert cfg.save_unfull_chunk is False
    assert cfg.remote_ttl == 600.0


def test_env_overrides() -> None:
    cfg = load_config(
        environ={
            "LMCACHE_LOCAL_CPU": "false",
            "LMCACHE_MAX_LOCAL_CPU_SIZE": "2",
            "LMCACHE_LOCAL_DISK": "/tmp/kv",
            "LMCACHE_REMOTE_URL": "valkeys://cache:6380",
            "LMCACHE_REMOTE_CLUSTER": "true",
            "LMCACHE_REMOTE_TIMEOUT": "250ms",
            "LMCACHE_LOCAL_DISK_FSYNC": "always",
            "LMCACHE_SAVE_DECODE_CACHE": "true",
        }
    )
    assert cfg.local_cpu is False and cfg.max_local_cpu_size == 2 * GIB
    assert cfg.local_disk == "/tmp/kv" and cfg.remote_url == "valkeys://cache:6380"
    assert cfg.remote_cluster and cfg.remote_timeout == 0.25
    assert cfg.local_disk_fsync == "always" and cfg.save_decode_cache


@pytest.mark.parametrize(
    ("key", "value"),
    [("remote_url", "http://cache:80"), ("remote_url", "cache:6379"), ("local_disk", "s3://b/k"),
     ("max_local_cpu_size", "-1"), ("max_local_cpu_size", "4 parsecs"),
     ("local_disk_fsync", "sometimes"), ("remote_max_connections", 0), ("cache_write_queue", 0),
     ("local_cpu_size", 1)],
)  # fmt: skip
def test_bad_values_and_unknown_keys_are_errors_naming_the_key(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=key):
        load_config(overrides={key: value}, environ={})


def test_store_settings_from_config() -> None:
    cfg = load_config(
        overrides={
            "max_local_cpu_size": "64MiB",
            "local_disk": "file:///tmp/kv",
            "max_local_disk_size": "1GiB",
            "remote_url": "redis+cluster://h:7000",
            "remote_ttl": "1h",
            "cache_lease_ttl": "5s",
            "cache_write_queue": 8,
            "pool_device": "pinned",
        },
        environ={},
    )
    s = StoreSettings.from_config(cfg)
    assert s.l1_enabled and s.l2_enabled and s.l3_enabled
    assert s.max_local_cpu_size == 64 << 20 and s.local_disk == Path("/tmp/kv")
    assert s.max_local_disk_size == GIB and s.remote_ttl == 3600.0
    assert s.lease_ttl == 5.0 and s.write_queue == 8 and s.l1_device == "pinned"
    off = StoreSettings.from_config(load_config(overrides={"local_cpu": False}, environ={}))
    assert not (off.l1_enabled or off.l2_enabled or off.l3_enabled)
