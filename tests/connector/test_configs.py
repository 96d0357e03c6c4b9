"""Every example in configs/ validates against the one schema."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmcache_disagg.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def test_the_four_examples_exist() -> None:
    names = {path.name for path in CONFIGS}
    assert {"1p1d-tcp.yaml", "1p1d-nixl.yaml", "xpyd.yaml", "cpu-demo.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_validates(path: Path) -> None:
    config = load_config(path, environ={})
    assert config.chunk_size > 0
    for instance in config.decode_instances:
        assert instance.http
    if config.listen_host not in ("127.0.0.1", "localhost", "::1"):
        assert config.cluster_secret, "a non-loopback listener needs a cluster secret"


def test_extra_config_overrides_the_file(tmp_path: Path) -> None:
    config = load_config(CONFIGS[0], overrides={"channel": "tcp", "listen_port": 12345}, environ={})
    assert (config.channel, config.listen_port) == ("tcp", 12345)
