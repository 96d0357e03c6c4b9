"""``lmcache-disagg bench routing``: runs end to end (real publishers, subscriber and index)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lmcache_disagg.bench.routing import POLICIES, main


def test_bench_json_smoke() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "lmcache_disagg.cli", "bench", "routing", "--json", "--users", "8",
         "--rounds", "3", "--workers", "2", "--cache-chunks", "96"],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    assert "SIMULATED" in out.stdout
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["bench"] == "routing" and report["simulated_workers"] is True
    assert report["working_set_chunks"] > report["cache_chunks_per_worker"]
    assert set(report["results"]) == set(POLICIES)
    for row in report["results"].values():
        assert 0 <= row["hit_rate"] <= 1 and row["requests"] == 8 * 3
        assert sum(row["requests_per_worker"]) == 24 and row["p90_ttft_ms"] >= 0
    aware = report["results"]["cache_aware"]
    # The index was in step at every decision, so the prediction is exactly what was hit.
    assert aware["stale_decisions"] == 0
    assert aware["predicted_hit_tokens"] == aware["hit_tokens"]


def test_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--policies", "magic"], ["--workers", "1"], ["--question-tokens", "9,3"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
