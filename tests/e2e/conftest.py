"""Fixtures of the real-vLLM end-to-end tests.

The monolithic baseline runs ALONE, first (2 cores: never beside a P/D pair), once per session;
every PD module compares against its cached results.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lmcache_disagg.vllm_server import VLLMServer, VLLMServerSpec
from tests.e2e.utils import Result, all_specs, run_all


@pytest.fixture(scope="session")
def baseline_results(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Result]:
    """Outputs of one plain vLLM (no connector) for every spec of :func:`all_specs`."""
    log = tmp_path_factory.mktemp("baseline") / "baseline.log"
    server = VLLMServer(VLLMServerSpec(model_dir=str(tiny_model_dir), cpu_core=0), log)
    try:
        server.start()
        return run_all(server.url, str(tiny_model_dir), all_specs())
    finally:
        server.stop()
