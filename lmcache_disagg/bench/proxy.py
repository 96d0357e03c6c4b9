"""``lmcache-disagg bench proxy``: this proxy vs. vllm-router on the same stub workers.

Default mode: one stub P and one stub D; our proxy with 1 and 2 processes and, if installed,
``vllm-router --vllm-pd-disaggregation`` on the same stubs. Each target gets the same closed-loop
load (``--concurrency`` clients, 16-token answers, streamed and not) from a load generator in its
own process. Targets are measured interleaved (order reversed every other round), ``--rounds``
times; the median is reported, and the ratio to vllm-router is the median of per-round ratios
(the baseline is always measured in the same run, next to each measurement).

``--faults``: two P and two D stubs, one of each faulty (faults rotate through 500, reset, hang and
slow/die every segment), our proxy only, mixed streamed and non-streamed load. Reports the status
counts (5xx must be 0), in-band SSE errors and the proxy's RSS after each segment.

``--json`` prints one JSON object as the last stdout line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from lmcache_disagg.bench.cluster import (
    Proc,
    free_port,
    free_port_pair,
    rss_bytes,
    start_proxy,
    start_stub,
    wait_http,
)

__all__ = ["main", "router_binary"]

CACHE_AWARE = "lmcache-disagg-proxy cache_aware (workers=1)"
_PROMPT = "The quick brown fox jumps over the lazy dog while the proxy routes prefill and decode"


def _bodies(max_tokens: int) -> dict[str, str]:
    base = {"model": "stub-model", "prompt": _PROMPT, "max_tokens": max_tokens}
    return {
        "non_stream": json.dumps(base),
        "stream": json.dumps({**base, "stream": True}),
    }


def _load(
    target: str, body: str, requests: int, concurrency: int, warmup: int, timeout: float = 60.0
) -> dict[str, Any]:
    out = subprocess.run(
        [
            sys.executable, "-m", "lmcache_disagg.bench.loadgen", "--target", target,
            "--body", body, "--requests", str(requests), "--concurrency", str(concurrency),
            "--warmup", str(warmup), "--timeout", str(timeout),
        ],
        capture_output=True, text=True, check=True, timeout=max(600.0, requests / 10),
    )  # fmt: skip
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def router_binary() -> str | None:
    local = Path(sys.executable).parent / "vllm-router"
    if local.exists():
        return str(local)
    return shutil.which("vllm-router")


def _wait_generate(target: str, proc: Proc, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    body = _bodies(2)["non_stream"].encode()
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited:\n{proc.log_text()[-2000:]}")
        try:
            req = urllib.request.Request(
                f"http://{target}/v1/completions", body, {"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(req, timeout=2.0) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{proc.name} did not serve within {timeout}s")


def _throughput(args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    p_port, d_port = free_port(), free_port()
    procs: list[Proc] = []
    events = {port: f"tcp://127.0.0.1:{free_port_pair()}" for port in (p_port, d_port)}

    def stub_flags(port: int) -> list[str]:
        if not args.cache_aware:
            return []
        return ["--kv-events", events[port], "--tokenizer", args.cache_aware]

    try:
        procs.append(start_stub("prefill", p_port, log_dir, stub_flags(p_port)))
        procs.append(start_stub("decode", d_port, log_dir, stub_flags(d_port)))
        for proc, port in zip(procs, (p_port, d_port), strict=True):
            wait_http(f"http://127.0.0.1:{port}/health", proc=proc)
        targets: dict[str, str] = {}
        for n in args.proxy_workers:
            port = free_port()
            proxy = start_proxy(
                port, [f"127.0.0.1:{p_port}"], [f"127.0.0.1:{d_port}"], log_dir,
                ["--workers", str(n), "--no-access-log", "--log-level", "warning"],
            )  # fmt: skip
            procs.append(proxy)
            _wait_generate(f"127.0.0.1:{port}", proxy)
            targets[f"lmcache-disagg-proxy (workers={n})"] = f"127.0.0.1:{port}"
        if args.cache_aware:
            port = free_port()
            flags = ["--policy", "cache_aware", "--tokenizer", args.cache_aware,
                     "--skip-prefill-chunks", str(args.skip_prefill_chunks)]  # fmt: skip
            for stub_port, endpoint in events.items():
                flags += ["--kv-events", f"127.0.0.1:{stub_port}={endpoint}"]
            proxy = start_proxy(
                port, [f"127.0.0.1:{p_port}"], [f"127.0.0.1:{d_port}"], log_dir,
                [*flags, "--no-access-log", "--log-level", "warning"],
            )  # fmt: skip
            procs.append(proxy)
            _wait_generate(f"127.0.0.1:{port}", proxy)
            targets[CACHE_AWARE] = f"127.0.0.1:{port}"
        router = router_binary() if not args.no_router else None
        if router is not None:
            port = free_port()
            proc = Proc(
                "vllm-router",
                [
                    router, "--vllm-pd-disaggregation", "--prefill", f"http://127.0.0.1:{p_port}",
                    "--decode", f"http://127.0.0.1:{d_port}", "--policy", "round_robin",
                    "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
                ],
                log_dir / "vllm-router.log",
                dict(os.environ),
            )  # fmt: skip
            procs.append(proc)
            _wait_generate(f"127.0.0.1:{port}", proc)
            targets["vllm-router"] = f"127.0.0.1:{port}"
        samples: dict[str, dict[str, list[dict[str, Any]]]] = {}
        order = list(targets.items())
        for round_index in range(args.rounds):
            # Alternate the order (ABC, CBA, ...) so drifting background load on this shared
            # machine does not systematically favour whichever target runs first.
            ordered = order if round_index % 2 == 0 else order[::-1]
            for mode, body in _bodies(args.max_tokens).items():
                for name, target in ordered:
                    result = _load(target, body, args.requests, args.concurrency, args.warmup)
                    samples.setdefault(mode, {}).setdefault(name, []).append(result)
        return _summarise(samples)
    finally:
        for proc in reversed(procs):
            proc.stop()


def _summarise(samples: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for mode, by_target in samples.items():
        rows: dict[str, Any] = {}
        for name, results in by_target.items():
            rows[name] = {
                "req_per_s": statistics.median(r["req_per_s"] for r in results),
                "p50_ms": statistics.median(r["p50_ms"] for r in results),
                "p99_ms": statistics.median(r["p99_ms"] for r in results),
                "non_200": sum(n for r in results for s, n in r["statuses"].items() if s != "200"),
                "rounds": [round(r["req_per_s"]) for r in results],
            }
        aware, plain = by_target.get(CACHE_AWARE), by_target.get("lmcache-disagg-proxy (workers=1)")
        if aware and plain:
            rows[CACHE_AWARE]["ratio_vs_round_robin"] = statistics.median(
                a["req_per_s"] / b["req_per_s"] for a, b in zip(aware, plain, strict=True)
            )
        base = by_target.get("vllm-router")
        if base:
            # Ratios are paired per round (same background load), then the median is taken.
            for name, row in rows.items():
                results = by_target[name]
                row["ratio_req_per_s"] = statistics.median(
                    r["req_per_s"] / b["req_per_s"] for r, b in zip(results, base, strict=True)
                )
                row["ratio_p50"] = statistics.median(
                    r["p50_ms"] / b["p50_ms"] for r, b in zip(results, base, strict=True)
                )
        summary[mode] = rows
    return summary


def _set_fault(port: int, fault: str, rate: float, slow_delay: float = 0.02) -> None:
    body = json.dumps({"fault": fault, "rate": rate, "slow_delay": slow_delay}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/stub/fault", body)
    with urllib.request.urlopen(req, timeout=5.0):
        pass


# (faulty P mode, faulty D mode) per segment; rate applies to the faulty worker only.
FAULT_SEGMENTS = (("500", "500"), ("reset", "reset"), ("hang", "hang"), ("500", "slow"))


def run_fault_load(
    requests: int,
    concurrency: int,
    log_dir: Path,
    segments: int = 10,
    rate: float = 0.5,
    include_die: bool = False,
) -> dict[str, Any]:
    """The fault run (also used by the tests): returns statuses, SSE problems, RSS per segment."""
    ports = {name: free_port() for name in ("p_ok", "p_bad", "d_ok", "d_bad", "proxy")}
    procs: list[Proc] = []
    try:
        for name in ("p_ok", "p_bad", "d_ok", "d_bad"):
            role = "prefill" if name.startswith("p") else "decode"
            procs.append(start_stub(role, ports[name], log_dir))
        for proc, name in zip(procs, ("p_ok", "p_bad", "d_ok", "d_bad"), strict=True):
            wait_http(f"http://127.0.0.1:{ports[name]}/health", proc=proc)
        proxy = start_proxy(
            ports["proxy"],
            [f"127.0.0.1:{ports['p_ok']}", f"127.0.0.1:{ports['p_bad']}"],
            [f"127.0.0.1:{ports['d_ok']}", f"127.0.0.1:{ports['d_bad']}"],
            log_dir,
            [
                "--prefill-timeout", "0.5", "--first-byte-timeout", "0.5", "--idle-timeout", "0.5",
                "--decode-timeout", "1.0", "--health-interval", "0.5", "--breaker-cooldown", "0.5",
                "--breaker-threshold", "2", "--no-access-log", "--log-level", "warning",
            ],
        )  # fmt: skip
        procs.append(proxy)
        wait_http(f"http://127.0.0.1:{ports['proxy']}/ready", proc=proxy)
        target = f"127.0.0.1:{ports['proxy']}"
        bodies = _bodies(16)
        per_segment = max(requests // segments, 2)
        plan = list(FAULT_SEGMENTS)
        if include_die:
            plan.append(("reset", "die"))
        statuses: dict[str, int] = {}
        problems: dict[str, int] = {}
        rss: list[int] = []
        for index in range(segments):
            p_fault, d_fault = plan[index % len(plan)]
            _set_fault(ports["p_bad"], p_fault, rate)
            _set_fault(ports["d_bad"], d_fault, rate)
            half = per_segment // 2
            runners = [
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "lmcache_disagg.bench.loadgen",
                        "--target",
                        target,
                        "--body",
                        bodies[mode],
                        "--requests",
                        str(half),
                        "--concurrency",
                        str(max(concurrency // 2, 1)),
                        "--warmup",
                        "0",
                        "--timeout",
                        "30",
                    ],
                    stdout=subprocess.PIPE,
                    text=True,
                )
                for mode in ("non_stream", "stream")
            ]
            for runner in runners:
                out, _ = runner.communicate(timeout=600)
                result = json.loads(out.strip().splitlines()[-1])
                for status, count in result["statuses"].items():
                    statuses[status] = statuses.get(status, 0) + count
                for problem, count in result["problems"].items():
                    problems[problem] = problems.get(problem, 0) + count
            rss.append(rss_bytes(proxy.pid))
        metrics = urllib.request.urlopen(f"http://{target}/metrics", timeout=5).read().decode()
        counters = {
            line.split(" ")[0]: float(line.split(" ")[1])
            for line in metrics.splitlines()
            if line.startswith(("lmcache_proxy_retries_total", "lmcache_proxy_fallbacks_total"))
        }
        total = sum(statuses.values())
        five_xx = sum(n for s, n in statuses.items() if s.startswith("5"))
        warm = rss[min(1, len(rss) - 1)]
        return {
            "requests": total,
            "statuses": statuses,
            "client_5xx": five_xx,
            "problems": problems,
            "rss_mib_per_segment": [round(r / 2**20, 2) for r in rss],
            "rss_growth_after_warmup_mib": round((rss[-1] - warm) / 2**20, 2),
            "counters": counters,
        }
    finally:
        for proc in reversed(procs):
            proc.stop()


def _clients(args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    from lmcache_disagg.bench.clients import compare_clients

    port = free_port()
    stub = start_stub("decode", port, log_dir)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc=stub)
        rounds: list[dict[str, Any]] = [
            compare_clients(f"127.0.0.1:{port}", args.requests or 5000, args.concurrency)
            for _ in range(args.rounds)
        ]
    finally:
        stub.stop()
    result = {
        name: statistics.median(r[name] for r in rounds) if rounds[0][name] else None
        for name in rounds[0]
    }
    for name, rate in result.items():
        print(f"  {name:32} {rate:9.0f} req/s" if rate else f"  {name:32} not installed")
    return result


def _print_table(summary: dict[str, Any]) -> None:
    for mode, rows in summary.items():
        print(f"\n{mode}:")
        print(
            f"  {'target':36} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'x router':>9}"
            f" {'p50/router':>10}"
        )
        for name, row in rows.items():
            ratio = row.get("ratio_req_per_s")
            ratio_text = f"{ratio:9.2f}" if ratio is not None else f"{'-':>9}"
            p50_ratio = row.get("ratio_p50")
            p50_text = f"{p50_ratio:10.2f}" if p50_ratio is not None else f"{'-':>10}"
            print(
                f"  {name:36} {row['req_per_s']:9.0f} {row['p50_ms']:8.2f} {row['p99_ms']:8.2f}"
                f" {ratio_text} {p50_text}   rounds={row['rounds']}"
            )
        aware = rows.get(CACHE_AWARE, {}).get("ratio_vs_round_robin")
        if aware is not None:
            print(f"  cache_aware / round_robin req/s (median of per-round ratios): {aware:.2f}")
        print("  (x router, p50/router: median over rounds of the per-round ratio)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lmcache-disagg bench proxy")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.add_argument("--requests", type=int, default=None)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--proxy-workers", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2],
        help="comma list of --workers values to measure (default 1,2)",
    )  # fmt: skip
    parser.add_argument("--no-router", action="store_true")
    parser.add_argument(
        "--cache-aware", metavar="TOKENIZER_DIR",
        help="also measure --policy cache_aware (stubs publish KV events; the proxy tokenizes "
        "with this model's tokenizer) against round_robin on the same stubs",
    )  # fmt: skip
    parser.add_argument(
        "--skip-prefill-chunks", type=int, default=-1,
        help="with --cache-aware: the proxy's flag; -1 (default) keeps every request on P and "
        "D like round_robin, so the ratio measures the routing cost alone",
    )  # fmt: skip
    parser.add_argument("--faults", action="store_true", help="the fault-injection run")
    parser.add_argument("--clients", action="store_true",
                        help="compare upstream HTTP clients (aiohttp, httpx, ours) on one stub")  # fmt: skip
    parser.add_argument("--include-die", action="store_true",
                        help="--faults: also let D die mid-stream (in-band SSE errors)")  # fmt: skip
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lmcache-bench-proxy-") as tmp:
        log_dir = Path(tmp)
        out: dict[str, Any]
        if args.clients:
            out = {"mode": "clients", "req_per_s": _clients(args, log_dir)}
        elif args.faults:
            result = run_fault_load(
                args.requests or 10000, args.concurrency, log_dir, include_die=args.include_die
            )
            print(
                f"fault run: {result['requests']} requests, statuses {result['statuses']}, "
                f"client 5xx {result['client_5xx']}, problems {result['problems']}"
            )
            print(f"proxy RSS MiB per segment: {result['rss_mib_per_segment']}")
            print(f"retries/fallbacks: {result['counters']}")
            out = {"mode": "faults", **result}
        else:
            args.requests = args.requests or 2000
            summary = _throughput(args, log_dir)
            _print_table(summary)
            out = {
                "mode": "throughput",
                "requests": args.requests,
                "concurrency": args.concurrency,
                "rounds": args.rounds,
                "results": summary,
            }
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
