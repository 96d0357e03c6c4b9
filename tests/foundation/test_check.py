"""``lmcache-disagg check`` without vLLM: config errors, missing workers, dead addresses.

The real-cluster cases (healthy, wrong KV port, dtype mismatch, missing connector, bad secret) are
in tests/e2e/test_operate.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from lmcache_disagg.check import parse_metrics_labels
from lmcache_disagg.vllm_server import free_port


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lmcache_disagg.cli", "check", "--timeout", "1", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )


def test_an_invalid_config_exits_2_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("chunk_size: -3\n")
    done = _run("--config", str(config))
    assert done.returncode == 2
    assert done.stderr.startswith("problem: invalid lmcache-disagg config: chunk_size")


def test_no_workers_is_a_problem() -> None:
    done = _run()
    assert done.returncode == 1
    assert "problem: no prefill or no decode worker to check" in done.stderr


def test_dead_workers_give_one_line_each() -> None:
    p, d, kv = free_port(), free_port(), free_port()
    done = _run("--prefill", f"127.0.0.1:{p}", "--decode", f"127.0.0.1:{d},kv=127.0.0.1:{kv}")
    assert done.returncode == 1
    problems = [line for line in done.stderr.splitlines() if line.startswith("problem:")]
    assert len(problems) == 3, done.stderr
    assert f"P 127.0.0.1:{p}: GET /v1/models failed" in problems[0]
    assert f"D 127.0.0.1:{d}: GET /v1/models failed" in problems[1]
    assert f"KV endpoint 127.0.0.1:{kv} did not answer the handshake" in problems[2]
    assert all("; fix: " in line for line in problems)
    header = done.stdout.splitlines()[0].split()
    assert header == ["role", "http", "model", "connector", "kv", "endpoint", "handshake",
                      "channel", "cache"]  # fmt: skip


def test_metric_labels_are_parsed_with_escapes() -> None:
    text = (
        "# TYPE lmcache_disagg_layout_info gauge\n"
        'lmcache_disagg_layout_info{role="kv_producer",model="a \\"b\\"",dtype="float32"} 1.0\n'
        'lmcache_disagg_layout_info_other{role="x"} 1\n'
    )
    (labels,) = parse_metrics_labels(text, "lmcache_disagg_layout_info")
    assert labels["role"] == "kv_producer" and labels["dtype"] == "float32"
