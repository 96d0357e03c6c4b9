"""``make demo`` end to end: the 1P1D demo prints both answers and shows the prompt KV was loaded.

With ``--prometheus`` (README) it also prints ``lmcache-disagg check``'s table of the running cluster
and how many dashboard queries a real Prometheus answered.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm


def test_demo_runs_pd_and_reports_loaded_tokens(tiny_model_dir: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lmcache_disagg.cli", "demo", "--model-dir", str(tiny_model_dir),
         "--prometheus"],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "[completion]" in result.stdout and "[streamed chat]" in result.stdout
    match = re.search(r"(\d+) prompt tokens loaded from P, (\d+) computed locally", result.stdout)
    assert match, result.stdout
    loaded, computed = int(match.group(1)), int(match.group(2))
    assert loaded > 1000  # both prompts' KV came from P ...
    assert computed <= 2  # ... and D computed only each prompt's last token
    assert "ok: the cluster is wired correctly" in result.stdout, result.stdout
    assert re.search(r"^P\s+127\.0\.0\.1:\d+\s+\S+\s+kv_producer", result.stdout, re.M)
    answered = re.search(r"answered (\d+) of (\d+) dashboard queries", result.stdout)
    assert answered, result.stdout
    assert int(answered.group(1)) > 0
    empty = re.search(r"^no data \(nothing of that kind happened\): (.*)$", result.stdout, re.M)
    # The connector's own series reach /metrics with the engine step after the event, so the last
    # request's may not have arrived yet; the proxy's and vLLM's request series always have.
    for healthy_path in ("Request rate", "vLLM TTFT"):
        assert empty is None or healthy_path not in empty.group(1), empty.group(1)
