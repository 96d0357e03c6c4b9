"""``lmcache-disagg bench kernels`` runs and prints one JSON object last."""

from __future__ import annotations

import json

import pytest

from lmcache_disagg.kernels.bench import main


def test_bench_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--json", "--iters", "1", "--shape", "tiny"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    report = json.loads(lines[-1])
    assert report["bench"] == "kernels"
    rows = {(r["shape"], r["layout"]) for r in report["results"]}
    assert rows == {("tiny", k) for k in ("cpu", "flash_nhd", "flash_hnd", "mla")}
    for r in report["results"]:
        assert r["bytes"] == 2 * 2 * 256 * 2 * 32 * 4
        for key in ("copy_gbps", "gather_gbps", "scatter_gbps", "gather_ratio", "scatter_ratio"):
            assert r[key] > 0


def test_bench_large_shape_one_layout(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--json", "--iters", "1", "--shape", "llama8b", "--layout", "flash_nhd"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    (row,) = report["results"]
    assert row["bytes"] == 32 * 2**20
