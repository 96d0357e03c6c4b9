"""``--workers 2``: two processes on one port (SO_REUSEPORT) share admin changes and stop cleanly."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import httpx

from tests.proxy.utils import Cluster, completion, wait_for

ADMIN = "adm-multi-key"


def _decoders(url: str) -> set[str]:
    # A new connection per call, so SO_REUSEPORT spreads the calls over both processes.
    resp = httpx.get(url + "/workers", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=5)
    return {w["http"] for w in resp.json()["workers"] if w["role"] == "decode"}


def test_two_processes_share_worker_changes_and_stop(cluster: Cluster) -> None:
    proxy = cluster.proxy(extra=["--workers", "2"], env={"LMCACHE_PROXY_ADMIN_KEY": ADMIN})
    pids = set()
    for _ in range(30):
        assert proxy.post("/v1/completions", completion()).status_code == 200
    auth = {"Authorization": f"Bearer {ADMIN}"}
    resp = httpx.post(proxy.url + "/workers", headers=auth, timeout=5,
                      json={"role": "decode", "http": cluster["d1"].addr})  # fmt: skip
    assert resp.status_code == 200
    both = {cluster["d0"].addr, cluster["d1"].addr}
    assert wait_for(lambda: all(_decoders(proxy.url) == both for _ in range(10)), timeout=5)
    resp = httpx.request("DELETE", proxy.url + "/workers", headers=auth, timeout=5,
                         json={"role": "decode", "http": cluster["d0"].addr})  # fmt: skip
    assert resp.status_code == 200
    only_d1 = {cluster["d1"].addr}
    assert wait_for(lambda: all(_decoders(proxy.url) == only_d1 for _ in range(10)), timeout=5)
    before = len(cluster["d0"].requests())
    for _ in range(10):
        assert proxy.post("/v1/completions", completion()).status_code == 200
    assert len(cluster["d0"].requests()) == before
    # Both children are alive under the parent, and SIGTERM to the parent ends them all.
    pid = proxy.proc.pid
    children = [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    pids.update(children)
    assert len(pids) >= 2  # the two servers (+ the spawn resource tracker)
    for child in pids:
        assert "multiprocessing" in Path(f"/proc/{child}/cmdline").read_text()
    os.kill(proxy.proc.pid, signal.SIGTERM)
    proxy.proc.popen.wait(15)
    assert wait_for(lambda: not any(os.path.exists(f"/proc/{p}") for p in pids), timeout=10)


def test_metrics_of_all_processes_are_merged(cluster: Cluster) -> None:
    """With --workers 2 a scrape lands on either process, and each answers the totals of both."""
    proxy = cluster.proxy(extra=["--workers", "2"])
    n = 40
    for _ in range(n):  # a new connection each, so SO_REUSEPORT spreads them over both processes
        assert proxy.post("/v1/completions", completion()).status_code == 200
    for _ in range(10):
        assert proxy.metric("lmcache_proxy_requests_total", status="200") == n
        assert proxy.metric("lmcache_proxy_e2e_seconds_count") == n
    # In-flight gauges are summed over live processes (0 now), health is per worker.
    assert proxy.metric("lmcache_proxy_worker_inflight") == 0
    assert proxy.metric("lmcache_proxy_worker_healthy", role="decode") == 1
