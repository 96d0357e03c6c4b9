"""Shared helpers of the trust tests: one P/D pair with an armable fault relay on D's data port.

Layout (all loopback)::

    client -> proxy -> P (core 0) --control--> D's KV listener (kv)
                         |
                         +--data--> relay (D advertises it) --> D's bound data port

D binds ``data_port`` and announces ``advertised_data_port`` = the relay, so every chunk P pushes
goes through :class:`~tests.trust.faults.ArmedFaultProxy`. P's ``push_allowlist`` names only D's KV
endpoint, so any other target - even on loopback - is refused.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from lmcache_disagg.vllm_server import VLLMServer, VLLMServerSpec, free_port
from tests.e2e.utils import (
    TRANSFER_ONLY,
    VERIFY_ENV,
    Proxy,
    connector_config,
    metric_labels,
    metric_sum,
    scrape,
    start_servers,
    token_prompt,
)
from tests.transfer.faultproxy import ArmedFaultProxy

# Short deadlines so a fault costs seconds; the TTL is the one the SIGKILL test waits out.
TIMEOUTS = {
    "connect_timeout": "2s",
    "handshake_timeout": "2s",
    "reserve_timeout": "2s",
    "push_deadline": "3s",
    "load_deadline": "4s",
    "reservation_ttl": "5s",
}
PUSH_DEADLINE = 3.0
RESERVATION_TTL = 5.0
POOL_GAUGES = ("pool_pages_used", "pending_loads", "send_pages_used", "pending_pushes")


class KillableProxy(Proxy):
    """The e2e proxy child process, plus its pid and a SIGKILL."""

    @property
    def pid(self) -> int:
        return self._process.pid

    def sigkill(self) -> None:
        os.kill(self._process.pid, signal.SIGKILL)
        self._process.wait(timeout=10)


@dataclass
class Cluster:
    """A running P/D pair with the relay in front of D's data port."""

    prefill: VLLMServer
    decode: VLLMServer
    relay: ArmedFaultProxy
    kv: str
    model: str
    log_dir: Path
    proxies: list[KillableProxy] = field(default_factory=list)

    def proxy(self, name: str) -> KillableProxy:
        proxy = KillableProxy(
            self.prefill.address,
            f"{self.decode.address},kv={self.kv}",
            self.log_dir / f"proxy-{name}.log",
            "--no-access-log",
        )
        self.proxies.append(proxy)
        proxy.wait_ready()
        return proxy

    def stop(self) -> None:
        for proxy in self.proxies:
            proxy.stop()
        self.prefill.stop()
        self.decode.stop()
        self.relay.close()


def start_cluster(model_dir: Path, log_dir: Path, *, verify: bool = False) -> Cluster:
    """D first (core 1), then P (core 0); raises with the log tail when one does not start."""
    kv_port, data_port, relay_port = free_port(), free_port(), free_port()
    kv = f"127.0.0.1:{kv_port}"
    relay = ArmedFaultProxy(data_port, listen_port=relay_port)
    d_config = {
        "channel": "tcp",
        "listen_port": kv_port,
        "data_port": data_port,
        "advertised_data_port": relay_port,
        **TIMEOUTS,
        **TRANSFER_ONLY,
    }
    p_config = {
        "channel": "tcp", "listen_port": 0, "push_allowlist": [kv], **TIMEOUTS, **TRANSFER_ONLY,
    }  # fmt: skip
    env = VERIFY_ENV if verify else {}

    def spec(role: str, core: int, config: dict[str, Any]) -> VLLMServerSpec:
        return VLLMServerSpec(
            model_dir=str(model_dir),
            cpu_core=core,
            kv_transfer_config=connector_config(role, **config),
            env=env,
            # Every prompt is reused: without prefix caching each request really takes the KV
            # path (a local prefix hit would skip the load) and D's direct answers are plain
            # local computes.
            extra_args=("--no-enable-prefix-caching",),
        )

    decode = VLLMServer(spec("kv_consumer", 1, d_config), log_dir / "decode.log")
    prefill = VLLMServer(spec("kv_producer", 0, p_config), log_dir / "prefill.log")
    try:
        start_servers(decode, prefill)
    except BaseException:
        relay.close()
        raise
    return Cluster(prefill, decode, relay, kv, str(model_dir), log_dir)


# -- requests -------------------------------------------------------------------------------------

Output = tuple[str, tuple[int, ...], str | None]


def complete(
    client: httpx.Client, base_url: str, model: str, prompt: list[int], **kw: Any
) -> Output:
    """One non-streaming completion: (text, token ids, finish reason)."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": kw.pop("max_tokens", 4),
        "temperature": 0,
        "return_token_ids": True,
        **kw,
    }
    response = client.post(base_url + "/v1/completions", json=body)
    response.raise_for_status()
    choice = response.json()["choices"][0]
    return choice["text"], tuple(choice.get("token_ids") or ()), choice.get("finish_reason")


def prompts(lengths: Iterable[int], seed: int) -> list[list[int]]:
    return [token_prompt(length, seed) for length in lengths]


def baseline(server: VLLMServer, model: str, items: list[list[int]], **kw: Any) -> list[Output]:
    """Outputs of ``server`` computing each prompt locally (no kv_transfer_params), in order."""
    with httpx.Client(timeout=120) as client:
        return [complete(client, server.url, model, prompt, **kw) for prompt in items]


# -- metrics --------------------------------------------------------------------------------------


def fallbacks(server: VLLMServer) -> dict[str, float]:
    return metric_labels(scrape(server), "lmcache_disagg_fallbacks_total", "reason")


def push_failures(server: VLLMServer) -> dict[str, float]:
    return metric_labels(scrape(server), "lmcache_disagg_push_failures_total", "reason")


def loads(server: VLLMServer) -> float:
    return metric_sum(scrape(server), "lmcache_disagg_loads_total")


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    out = {k: v - before.get(k, 0.0) for k, v in after.items()}
    return {k: v for k, v in out.items() if v}


def pool_gauges(cluster: Cluster) -> dict[str, float]:
    """Poke both engines (gauges are reported on engine steps), then read the pool gauges."""
    poke = token_prompt(3, 99)
    with httpx.Client(timeout=60) as client:
        for server in (cluster.prefill, cluster.decode):
            complete(client, server.url, cluster.model, poke, max_tokens=1)
    out: dict[str, float] = {}
    for side, server in (("P", cluster.prefill), ("D", cluster.decode)):
        text = scrape(server)
        for gauge in POOL_GAUGES:
            out[f"{side}.{gauge}"] = metric_sum(text, f"lmcache_disagg_{gauge}")
    return out


def wait_drained(cluster: Cluster, timeout: float) -> dict[str, float]:
    """Wait until every pool gauge on P and D is 0; returns the last reading."""
    deadline = time.monotonic() + timeout
    while True:
        gauges = pool_gauges(cluster)
        if not any(gauges.values()) or time.monotonic() > deadline:
            return gauges
        time.sleep(0.5)


def proxy_dropped_fields(proxy: Proxy) -> float:
    text = httpx.get(proxy.url + "/metrics", timeout=10).text
    return metric_sum(text, "lmcache_proxy_client_internal_fields_dropped_total")


def rss_mib(pid: int) -> float:
    """Resident set of ``pid`` and all its descendants (vLLM's engine core is a child), MiB."""
    root = psutil.Process(pid)
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total / (1 << 20)
