"""Soak: many requests over the real P->D path with a transport fault every N requests.

Every answer is compared with D's own local compute of the same prompt (a small set of distinct
prompts, so the baseline is cheap); pool gauges must drain to 0 and the RSS of the proxy, P and D
must stay flat after warm-up.

Run alone (starts its own P, D, relay and proxy; prints the figures, JSON last)::

    .venv/bin/python -m tests.trust.soak --requests 2000

The pytest module ``tests/trust/test_e2e.py`` calls :func:`run_soak` on its shared cluster.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.transfer.faultproxy import FAULTS
from tests.trust.utils import (
    Cluster,
    KillableProxy,
    baseline,
    complete,
    delta,
    fallbacks,
    loads,
    prompts,
    push_failures,
    rss_mib,
    start_cluster,
    wait_drained,
)

SOAK_LENGTHS = (5, 17, 40, 64, 100, 130, 200, 255, 256, 257, 300, 420)
SOAK_MAX_TOKENS = 4
# In the soak a delay fault stays below the push deadline (a stall, not a failure): 40 faults of
# several seconds each would dominate the run. Deadline-passing delays are tested on their own.
SOAK_DELAY = 0.5


@dataclass
class SoakReport:
    requests: int
    clients: int
    fault_every: int
    seconds: float = 0.0
    wrong: int = 0
    errors: int = 0
    faults_applied: dict[str, int] = field(default_factory=dict)
    d_fallbacks: dict[str, float] = field(default_factory=dict)
    p_push_failures: dict[str, float] = field(default_factory=dict)
    d_loads: float = 0.0
    leaked: dict[str, float] = field(default_factory=dict)
    rss_mib: dict[str, tuple[float, float]] = field(default_factory=dict)
    rss_samples: dict[str, list[float]] = field(default_factory=dict)
    """RSS (MiB) at warm-up and then every ``rss_every`` requests, per process."""
    examples: list[str] = field(default_factory=list)

    def rss_growth(self) -> dict[str, float]:
        return {name: round(after - before, 1) for name, (before, after) in self.rss_mib.items()}

    def summary(self) -> str:
        lines = [
            f"soak: {self.requests} requests, {self.clients} clients, a fault every "
            f"{self.fault_every} ({self.seconds:.1f}s, {self.requests / self.seconds:.1f} req/s)",
            f"  wrong outputs: {self.wrong}   errors: {self.errors}",
            f"  faults applied: {self.faults_applied}",
            f"  D fallbacks by reason: {self.d_fallbacks}   D loads: {self.d_loads:.0f}",
            f"  P push failures by reason: {self.p_push_failures}",
            f"  pool gauges after: {self.leaked}",
        ]
        for name, (before, after) in self.rss_mib.items():
            samples = " ".join(f"{value:.0f}" for value in self.rss_samples.get(name, []))
            lines.append(
                f"  RSS {name}: {before:.1f} MiB after warm-up -> {after:.1f} MiB "
                f"({after - before:+.1f}); samples: {samples}"
            )
        return "\n".join(lines)


def run_soak(
    cluster: Cluster,
    proxy: KillableProxy,
    *,
    requests: int = 2000,
    clients: int = 4,
    fault_every: int = 50,
    warmup: int = 200,
    rss_every: int = 200,
) -> SoakReport:
    """Drive ``requests`` completions through ``proxy`` and return the figures (asserts nothing)."""
    report = SoakReport(requests, clients, fault_every)
    items = prompts(SOAK_LENGTHS, seed=31)
    want = baseline(cluster.decode, cluster.model, items, max_tokens=SOAK_MAX_TOKENS)
    pids = {"proxy": proxy.pid, "P": cluster.prefill.pid, "D": cluster.decode.pid}
    fb0, pf0, loads0 = (
        fallbacks(cluster.decode),
        push_failures(cluster.prefill),
        loads(cluster.decode),
    )
    applied0 = dict(cluster.relay.applied)
    counter = itertools.count()
    fault_cycle = itertools.cycle(FAULTS)
    lock = threading.Lock()
    rss_before: dict[str, float] = {}

    def worker() -> None:
        with httpx.Client(timeout=120) as client:
            while (n := next(counter)) < requests:
                if n >= warmup and (n - warmup) % rss_every == 0:
                    sample = {name: rss_mib(pid) for name, pid in pids.items() if pid}
                    with lock:
                        if n == warmup:
                            rss_before.update(sample)
                        for name, value in sample.items():
                            report.rss_samples.setdefault(name, []).append(round(value, 1))
                if n and n % fault_every == 0:
                    fault = next(fault_cycle)
                    cluster.relay.arm(fault, delay=SOAK_DELAY if fault == "delay" else 0.0)
                index = n % len(items)
                try:
                    got = complete(
                        client, proxy.url, cluster.model, items[index], max_tokens=SOAK_MAX_TOKENS
                    )
                except httpx.HTTPError as exc:
                    with lock:
                        report.errors += 1
                        report.examples.append(f"request {n}: {exc!r}")
                    continue
                if got != want[index]:
                    with lock:
                        report.wrong += 1
                        if len(report.examples) < 10:
                            report.examples.append(f"request {n}: want {want[index]} got {got}")

    started = time.monotonic()
    threads = [threading.Thread(target=worker, name=f"soak-{i}") for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    report.seconds = time.monotonic() - started
    cluster.relay.disarm()
    report.leaked = wait_drained(cluster, timeout=30)
    rss_after = {name: rss_mib(pid) for name, pid in pids.items() if pid}
    for name, value in rss_after.items():
        report.rss_samples.setdefault(name, []).append(round(value, 1))
    report.rss_mib = {
        name: (round(rss_before.get(name, after), 1), round(after, 1))
        for name, after in rss_after.items()
    }
    report.faults_applied = {
        k: v - applied0.get(k, 0)
        for k, v in cluster.relay.applied.items()
        if v - applied0.get(k, 0)
    }
    report.d_fallbacks = delta(fallbacks(cluster.decode), fb0)
    report.p_push_failures = delta(push_failures(cluster.prefill), pf0)
    report.d_loads = loads(cluster.decode) - loads0
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--fault-every", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--log-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    from lmcache_disagg.tiny_model import TinyModelSpec, build_tiny_model

    repo = Path(__file__).resolve().parents[2]
    model_dir = args.model_dir or build_tiny_model(
        repo / ".models" / "tiny-f32", TinyModelSpec(dtype="float32")
    )
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="lmcd-soak-"))
    print(f"logs in {log_dir}", flush=True)
    cluster = start_cluster(model_dir, log_dir)
    try:
        proxy = cluster.proxy("soak")
        report = run_soak(
            cluster,
            proxy,
            requests=args.requests,
            clients=args.clients,
            fault_every=args.fault_every,
            warmup=min(args.warmup, args.requests // 2),
        )
    finally:
        cluster.stop()
    print(report.summary())
    for example in report.examples:
        print("  " + example)
    payload: dict[str, Any] = asdict(report)
    payload["rss_growth_mib"] = report.rss_growth()
    print(json.dumps(payload))
    ok = report.wrong == 0 and report.errors == 0 and not any(report.leaked.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
