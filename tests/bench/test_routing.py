"""``lmcache-disagg bench routing``: the real-HTTP run and the simulation, end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lmcache_disagg.bench.routing import main
from lmcache_disagg.bench.routing_sim import POLICIES as SIM_POLICIES
from lmcache_disagg.bench.routing_stats import parse_range, policy_figures


def test_http_bench_json_smoke(tiny_model_dir: Path) -> None:
    """Real processes: the proxy per policy and the oracle, on stub D's with real KV events."""
    policies = ["round_robin", "cache_aware", "oracle"]
    out = subprocess.run(
        [sys.executable, "-m", "lmcache_disagg.cli", "bench", "routing", "--json", "--users", "4",
         "--rounds", "2", "--workers", "2", "--think-s", "0.2", "--policies", ",".join(policies),
         "--tokenizer", str(tiny_model_dir)],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["bench"] == "routing" and report["simulated_workers"] is False
    assert report["working_set_chunks"] > report["cache_chunks_per_worker"] > 0
    assert list(report["results"]) == policies
    for row in report["results"].values():
        assert row["errors"] == 0, row["first_errors"]
        assert row["requests"] == 8 and sum(row["requests_per_worker"]) == 8
        assert 0 <= row["cached_tokens"] <= row["prompt_tokens"] and row["p90_ttft_ms"] > 0
    # Round 2 of every user repeats round 1's prompt as its prefix: a cache-aware placement hits.
    assert report["results"]["cache_aware"]["cached_tokens"] > 0
    assert report["results"]["oracle"]["cached_tokens"] > 0
    assert set(report["hit_rate_vs_oracle"]) == {"round_robin", "cache_aware"}


def test_sim_bench_json_smoke() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "lmcache_disagg.cli", "bench", "routing", "--simulate", "--json",
         "--users", "8",
         "--rounds", "3", "--workers", "2", "--cache-chunks", "96"],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    assert "SIMULATED" in out.stdout
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["bench"] == "routing" and report["simulated_workers"] is True
    assert report["working_set_chunks"] > report["cache_chunks_per_worker"]
    assert set(report["results"]) == set(SIM_POLICIES)
    for row in report["results"].values():
        assert 0 <= row["hit_rate"] <= 1 and row["requests"] == 8 * 3
        assert sum(row["requests_per_worker"]) == 24 and row["p90_ttft_ms"] >= 0
    aware = report["results"]["cache_aware"]
    # The index was in step at every decision, so the prediction is exactly what was hit.
    assert aware["stale_decisions"] == 0
    assert aware["predicted_hit_tokens"] == aware["hit_tokens"]


def test_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        ["--policies", "magic"], ["--workers", "1"], ["--question-words", "9,3"],
        ["--cache-fraction", "0"], ["--tokenizer", "/nonexistent"],
        ["--simulate", "--policies", "magic"], ["--simulate", "--question-tokens", "9,3"],
    ):  # fmt: skip
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2


def test_policy_figures() -> None:
    figures = policy_figures(30, 120, [0.3, 0.1, 0.2, 0.4], [3, 1])
    assert figures["hit_rate"] == 0.25 and figures["load_imbalance"] == 1.5
    assert abs(figures["mean_ttft_ms"] - 250.0) < 1e-9 and figures["p90_ttft_ms"] == 400.0
    assert policy_figures(0, 0, [], [])["hit_rate"] == 0.0
    assert parse_range("3,9") == (3, 9) and parse_range("4") == (4, 4)
