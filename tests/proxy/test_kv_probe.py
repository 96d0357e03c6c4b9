"""--kv-probe: a D counts as healthy only if its KV listener answers the (authenticated) handshake.

The receiver is the real transfer-layer KVReceiver in its own process (it may import torch; the
proxy never does).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from lmcache_disagg.bench.cluster import free_port
from tests.proxy.utils import Cluster, wait_for

SECRET = "cluster-secret-for-probe-test"

RECEIVER = """
import json, sys
from lmcache_disagg.config import LMCacheDisaggConfig
from lmcache_disagg.transfer.protocol import LayoutFingerprint
from lmcache_disagg.transfer.receiver import KVReceiver
spec = json.loads(sys.argv[1])
fp = LayoutFingerprint(model="tiny", dtype="float32", num_layers=2, num_kv_heads=2, head_dim=8,
                       chunk_size=16, tp_rank=0, tp_size=1)
receiver = KVReceiver(LMCacheDisaggConfig(**spec), fp)
receiver.start()
print(json.dumps({"endpoint": receiver.endpoint}), flush=True)
sys.stdin.read()
receiver.shutdown()
"""


@pytest.fixture
def kv_receiver() -> Iterator[str]:
    port = free_port()
    spec = {"listen_port": port, "cluster_secret": SECRET, "pool_size": "4MiB", "channel": "tcp"}
    proc = subprocess.Popen(
        [sys.executable, "-c", RECEIVER, json.dumps(spec)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, "receiver did not start"
        yield f"127.0.0.1:{port}"
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _ready(url: str) -> bool:
    return httpx.get(url + "/ready", timeout=2).status_code == 200


def test_kv_probe_gates_readiness(cluster: Cluster, kv_receiver: str) -> None:
    d = f"{cluster['d0'].addr},kv={kv_receiver}"
    good = cluster.proxy(decode=[d], extra=["--kv-probe"],
                         env={"LMCACHE_CLUSTER_SECRET": SECRET}, wait_ready=False)  # fmt: skip
    assert wait_for(lambda: _ready(good.url), timeout=10)
    wrong = cluster.proxy(decode=[d], extra=["--kv-probe"],
                          env={"LMCACHE_CLUSTER_SECRET": "not-the-secret"}, wait_ready=False)  # fmt: skip
    dead = cluster.proxy(decode=[f"{cluster['d0'].addr},kv=127.0.0.1:{free_port()}"],
                         extra=["--kv-probe"], wait_ready=False)  # fmt: skip
    time.sleep(1.0)
    assert not _ready(wrong.url)
    assert not _ready(dead.url)
    assert wrong.metric("lmcache_proxy_kv_probe_failures_total", reason="auth") >= 1
    assert dead.metric("lmcache_proxy_kv_probe_failures_total", reason="unreachable") >= 1
    # Without --kv-probe, HTTP health alone decides.
    plain = cluster.proxy(decode=[f"{cluster['d0'].addr},kv=127.0.0.1:{free_port()}"])
    assert _ready(plain.url)
    wrong.proc.stop()
    assert SECRET not in good.log_text() and "not-the-secret" not in wrong.log_text()
