"""Fixtures for the proxy tests: long-lived stub workers and a factory for proxies.

The four stubs (2 P, 2 D) live for the whole session and are reset (faults off, logs cleared)
before every test; each test starts the proxy configuration it needs (about 0.3 s each).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from lmcache_disagg.bench.cluster import Proc, free_port, start_stub, wait_http
from tests.proxy.utils import Cluster, Stub


@pytest.fixture(scope="session")
def stub_procs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Stub]]:
    log_dir = tmp_path_factory.mktemp("stubs")
    stubs: dict[str, Stub] = {}
    procs: list[Proc] = []
    try:
        for name in ("p0", "p1", "d0", "d1"):
            port = free_port()
            role = "prefill" if name.startswith("p") else "decode"
            proc = start_stub(role, port, log_dir)
            procs.append(proc)
            stubs[name] = Stub(name, port, proc)
        for stub in stubs.values():
            wait_http(f"{stub.url}/health", proc=stub.proc)
        yield stubs
    finally:
        for proc in procs:
            proc.stop()


@pytest.fixture
def cluster(stub_procs: dict[str, Stub], tmp_path: Path) -> Iterator[Cluster]:
    for stub in stub_procs.values():
        stub.reset()
    c = Cluster(stub_procs, tmp_path)
    yield c
    c.stop_all()
