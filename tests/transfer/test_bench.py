"""Smoke test of ``lmcache-disagg bench transfer`` (tiny sizes; no performance assertions)."""

from __future__ import annotations

import json

import pytest

from lmcache_disagg.transfer.bench import main


@pytest.mark.parametrize("channel", ["tcp", "nixl"])
def test_bench_prints_one_json_object_last(
    channel: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--channel", channel, "--chunk-bytes", "1MiB", "--total", "8MiB", "--rounds", "1"]
    assert main([*argv, "--json"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads(last)
    assert result["channel_used"] == channel and result["chunks"] == 8
    assert result["channel_gbps"] > 0 and result["raw_gbps"] > 0
    assert result["checksum_failures"] == 0
