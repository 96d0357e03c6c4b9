"""The periodic status line: its arithmetic over two real metric expositions, and its loop."""

from __future__ import annotations

import asyncio
import http.server
import re
import threading
import time
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest

from lmcache_disagg.proxy.metrics import ProxyMetrics
from lmcache_disagg.proxy.statusline import histogram_quantile, render, run, take_snapshot
from tests.proxy.utils import Cluster, completion

# Units an option that takes a number names as its metavar.
UNITS = {"SECONDS", "BYTES", "TOKENS", "REQUESTS", "FAILURES", "N", "PORT"}


def _worker_registry() -> tuple[CollectorRegistry, Counter, Counter, Counter]:
    registry = CollectorRegistry()
    received = Counter("lmcache_disagg_bytes_received", "bytes", registry=registry)
    hits = Counter("lmcache_disagg_cache_hit_tokens", "hit tokens", ["tier"], registry=registry)
    prompts = Counter("vllm:prompt_tokens", "prompt tokens", registry=registry)
    return registry, received, hits, prompts


def test_the_line_covers_only_the_last_interval() -> None:
    metrics = ProxyMetrics()
    registry, received, hits, prompts = _worker_registry()
    # Before the interval: traffic that must not show in the line.
    metrics.requests.labels("/v1/completions", "200").inc(50)
    metrics.decode_ttft_seconds.observe(9.0)
    received.inc(5e9)
    before = take_snapshot(metrics.render().decode(), [generate_latest(registry).decode()], 100.0)
    metrics.requests.labels("/v1/completions", "200").inc(18)
    metrics.requests.labels("/v1/completions", "503").inc(2)
    for _ in range(10):
        metrics.decode_ttft_seconds.observe(0.04)
    metrics.inflight.labels("decode", "d:1").set(3)
    metrics.inflight.labels("prefill", "p:1").set(1)
    received.inc(2e9)
    hits.labels("l1").inc(300)
    prompts.inc(1200)
    after = take_snapshot(metrics.render().decode(), [generate_latest(registry).decode()], 110.0)
    line = render(before, after)
    assert line == (
        "proxy: 2.0 req/s, 3 in flight, p50 TTFT 38 ms, 2 errors, KV 0.20 GB/s, "
        "cache hit 25.0% (10s)"
    )


def test_no_workers_metrics_and_no_requests_show_dashes() -> None:
    metrics = ProxyMetrics()
    a = take_snapshot(metrics.render().decode(), [""], 0.0)
    b = take_snapshot(metrics.render().decode(), [""], 5.0)
    assert render(a, b) == (
        "proxy: 0.0 req/s, 0 in flight, p50 TTFT -, 0 errors, KV -, cache hit - (5s)"
    )


def test_quantile_matches_prometheus_interpolation() -> None:
    buckets = {0.1: 0.0, 0.2: 10.0, 0.4: 20.0, float("inf"): 20.0}
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.2)
    assert histogram_quantile(0.75, buckets) == pytest.approx(0.3)
    assert histogram_quantile(0.5, {float("inf"): 0.0}) is None


@pytest.fixture
def worker_url() -> Iterator[str]:
    registry, received, _, _ = _worker_registry()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            received.inc(1e9)  # each scrape sees one more GB than the last
            body = generate_latest(registry)
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_loop_scrapes_workers_and_emits_one_line_per_interval(worker_url: str) -> None:
    metrics = ProxyMetrics()
    lines: list[str] = []

    async def main() -> None:
        task = asyncio.create_task(
            run(0.05, lambda: metrics.render().decode(), lambda: [worker_url], lines.append)
        )
        deadline = asyncio.get_running_loop().time() + 20
        while len(lines) < 2 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert len(lines) >= 2
    assert all(line.startswith("proxy: 0.0 req/s, 0 in flight") for line in lines)
    assert all(" GB/s" in line and "KV -" not in line for line in lines)


def test_interval_zero_is_off() -> None:
    lines: list[str] = []
    asyncio.run(run(0, lambda: "", lambda: ["http://127.0.0.1:9"], lines.append))
    assert lines == []


def test_the_proxy_logs_its_status_line(cluster: Cluster) -> None:
    proxy = cluster.proxy(extra=["--status-interval", "0.5"])
    for _ in range(5):
        assert proxy.post("/v1/completions", completion()).status_code == 200

    def busy_line() -> str | None:
        lines = [ln for ln in proxy.log_text().splitlines() if "proxy: " in ln and "req/s" in ln]
        busy = [ln for ln in lines if not re.search(r"proxy: 0\.0 req/s", ln)]
        return busy[0] if busy else None

    deadline = time.monotonic() + 20
    while busy_line() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    line = busy_line()
    assert line is not None, proxy.log_text()[-2000:]
    assert re.search(r"proxy: \d+\.\d req/s, \d+ in flight, p50 TTFT \d+ ms, 0 errors, KV ", line)


def test_help_shows_every_option_with_its_unit_and_default() -> None:
    from lmcache_disagg.proxy.cli import build_parser

    parser = build_parser()
    text = parser.format_help()
    for action in parser._actions:
        if action.dest == "help":
            continue
        flag = action.option_strings[0]
        assert action.help, f"{flag} has no help"
        takes_value = action.nargs != 0
        if takes_value and action.type in (int, float):
            assert action.metavar in UNITS, f"{flag}: unit {action.metavar!r}"
        if action.type is float:
            assert action.metavar == "SECONDS", flag
    for name in ("--status-interval SECONDS", "--prefill-timeout SECONDS", "--max-body BYTES"):
        assert name in text
    assert text.count("(default:") == len([a for a in parser._actions if a.dest != "help"])
