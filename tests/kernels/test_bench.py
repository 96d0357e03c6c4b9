"""``lmcache-disagg bench kernels`` runs and prints one JSON object last."""

from __future__ import annotations

import json

import pytest
import torch

from lmcache_disagg.bench.kernels import BenchShape, main, pattern_copy
from lmcache_disagg.kernels.layouts import LAYOUT_KINDS
from lmcache_disagg.kernels.ops import gather


def test_bench_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--json", "--iters", "1", "--shape", "tiny"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    report = json.loads(lines[-1])
    assert report["bench"] == "kernels"
    rows = {(r["shape"], r["layout"]) for r in report["results"]}
    assert rows == {("tiny", k) for k in ("cpu", "flash_nhd", "flash_hnd", "mla")}
    for r in report["results"]:
        assert r["bytes"] == 2 * 2 * 256 * 2 * 32 * 4
        for key in (
            "copy_gbps",
            "gather_gbps",
            "scatter_gbps",
            "pattern_gbps",
            "gather_ratio",
            "scatter_ratio",
            "gather_vs_pattern",
        ):
            assert r[key] > 0


def test_bench_consecutive_blocks(capsys: pytest.CaptureFixture[str]) -> None:
    args = [
        "--json",
        "--iters",
        "1",
        "--shape",
        "tiny",
        "--layout",
        "cpu",
        "--blocks",
        "consecutive",
    ]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["blocks"] == "consecutive"
    (row,) = report["results"]
    assert row["gather_gbps"] > 0 and row["scatter_gbps"] > 0


def test_bench_large_shape_one_layout(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--json", "--iters", "1", "--shape", "llama8b", "--layout", "flash_nhd"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    (row,) = report["results"]
    assert row["bytes"] == 32 * 2**20


@pytest.mark.parametrize("kind", LAYOUT_KINDS)
def test_pattern_baseline_moves_the_same_elements_as_gather(kind: str) -> None:
    """The ``pattern`` baseline is only fair if it produces the chunk gather would, for the
    same (consecutive) blocks."""
    shape = BenchShape("check", 3, 2, 32, torch.bfloat16, block_size=32, num_tokens=96)
    layout = shape.layout(kind)  # type: ignore[arg-type]
    caches = layout.empty_caches(shape.num_layers, 5)
    for cache in caches:
        cache.copy_(torch.randn(cache.shape))
    n_blocks = shape.num_tokens // shape.block_size
    want = torch.empty(layout.chunk_shape(shape.num_layers, shape.num_tokens), dtype=layout.dtype)
    got = torch.full_like(want, float("nan"))
    gather(caches, layout, torch.arange(n_blocks), 0, shape.num_tokens, want)
    pattern_copy(layout, caches, got, n_blocks)
    assert torch.equal(got, want)
