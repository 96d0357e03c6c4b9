"""Fixtures with real Redis servers (see :mod:`tests.store.redis_servers`).

* ``redis_server``  - one fresh redis-server per test (``.url``, ``.cli()``, ``.pause()``,
  ``.resume()``, ``.stop()``, ``.start()`` again on the same port).
* ``redis_tls_server`` - the same, TLS only, self-signed cert (``.url`` is ``rediss://...``
  with ``ssl_ca_certs``).
* ``redis_cluster`` - a 3-node Redis Cluster, one per module (``.url``, ``.nodes``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .redis_servers import RedisCluster, RedisServer, make_tls_material


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_tls_server(tmp_path: Path) -> Iterator[RedisServer]:
    tls = make_tls_material(tmp_path / "tls")
    server = RedisServer(tmp_path / "redis-tls", tls=tls).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    cluster = RedisCluster(tmp_path_factory.mktemp("redis-cluster"))
    try:
        yield cluster.start()
    finally:
        cluster.stop()
