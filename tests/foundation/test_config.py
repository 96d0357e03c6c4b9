"""The shared YAML schema: sizes, durations, env overrides, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmcache_disagg.config import LMCacheDisaggConfig, load_config, parse_duration, parse_size
from lmcache_disagg.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("text", "expected"),
    [("2GiB", 2 * 1024**3), ("512MiB", 512 * 1024**2), ("1e9", 10**9), ("4 KB", 4000), (7, 7)],
)
def test_sizes(text: object, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"), [("500ms", 0.5), ("5s", 5.0), ("2m", 120.0), (3, 3.0)]
)
def test_durations(text: object, expected: float) -> None:
    assert parse_duration(text) == pytest.approx(expected)


def test_yaml_then_overrides_then_env(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("chunk_size: 128\npool_size: 1GiB\nchannel: tcp\n")
    config = load_config(path, overrides={"channel": "nixl"}, environ={"LMCACHE_CHUNK_SIZE": "64"})
    assert (config.chunk_size, config.pool_size, config.channel) == (64, 1024**3, "nixl")


def test_env_file_and_list_override(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("listen_port: 18000\n")
    config = load_config(
        environ={"LMCACHE_CONFIG_FILE": str(path), "LMCACHE_NIXL_BACKENDS": "UCX,GDS"}
    )
    assert config.listen_port == 18000
    assert config.nixl_backends == ("UCX", "GDS")


def test_unknown_key_is_named(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("chunk_sise: 128\n")
    with pytest.raises(ConfigError, match="chunk_sise: unknown key"):
        load_config(path, environ={})


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("chunk_size", 0, "chunk_size"),
        ("pool_size", "12 parsecs", "pool_size"),
        ("push_deadline", "-1s", "push_deadline"),
        ("channel", "carrier-pigeon", "channel"),
        ("push_allowlist", ["nohost"], "push_allowlist"),
    ],
)
def test_bad_values_name_the_key(key: str, value: object, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        load_config(overrides={key: value}, environ={})


def test_secret_never_in_repr() -> None:
    config = load_config(overrides={"cluster_secret": "hunter2-very-secret"}, environ={})
    assert "hunter2" not in repr(config) and "hunter2" not in str(config)
    assert config.cluster_secret == "hunter2-very-secret"


def test_every_shipped_example_config_validates() -> None:
    examples = sorted((REPO_ROOT / "configs").glob("*.yaml"))
    assert len(examples) >= 4
    for path in examples:
        assert isinstance(load_config(path, environ={}), LMCacheDisaggConfig), path
