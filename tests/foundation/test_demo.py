"""``make demo`` end to end: the 1P1D demo prints both answers and shows the prompt KV was loaded."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm


def test_demo_runs_pd_and_reports_loaded_tokens(tiny_model_dir: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lmcache_disagg.cli", "demo", "--model-dir", str(tiny_model_dir)],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "[completion]" in result.stdout and "[streamed chat]" in result.stdout
    match = re.search(r"(\d+) prompt tokens loaded from P, (\d+) computed locally", result.stdout)
    assert match, result.stdout
    loaded, computed = int(match.group(1)), int(match.group(2))
    assert loaded > 1000  # both prompts' KV came from P ...
    assert computed <= 2  # ... and D computed only each prompt's last token
