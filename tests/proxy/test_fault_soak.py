"""A shortened version of ``lmcache-disagg bench proxy --faults --requests 10000``."""

from __future__ import annotations

from pathlib import Path

from lmcache_disagg.bench.proxy import run_fault_load


def test_fault_run_no_client_5xx_and_flat_rss(tmp_path: Path) -> None:
    result = run_fault_load(requests=1200, concurrency=16, log_dir=tmp_path, segments=6)
    assert result["requests"] == 1200
    assert result["client_5xx"] == 0, result
    assert set(result["statuses"]) == {"200"}, result
    assert result["problems"] == {}, result
    # The faulty workers were really hit and worked around.
    assert sum(v for k, v in result["counters"].items() if "retries" in k) > 0
    # No RSS growth after warm-up beyond allocator noise.
    assert result["rss_growth_after_warmup_mib"] < 8, result["rss_mib_per_segment"]
