"""``lmcache-disagg bench kernels [--json]``: gather/scatter bandwidth next to ``copy_``.

For each shape (a Llama-8B-like chunk and the tiny test model's) and each layout that runs on the
CPU, it times gather and scatter of one 256-token chunk whose blocks are scattered through the
cache, interleaved with ``torch.Tensor.copy_`` of the same number of bytes between two contiguous
buffers. It reports the best of the interleaved rounds (the ratios of bests are what the
acceptance bar uses) and the medians. Read the ratios, not the absolute numbers (a shared machine
is noisy).

A third baseline, ``pattern``, is one strided ``copy_`` per K/V cell view between the chunk and
the first blocks of the cache (physically consecutive, so no per-block calls): the same element
order the layout forces on gather, minus the block indirection. ``copy_`` measures the memory;
``pattern`` measures what the layout itself costs (vLLM 0.32 interleaves K and V per token and
head, so even the token-major ``flash_nhd`` moves ``head_dim``-sized pieces); gather/pattern is
what is left to our implementation.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lmcache_disagg.kernels.errors import LayoutError
from lmcache_disagg.kernels.layouts import KVLayout, LayoutKind, layer_groups
from lmcache_disagg.kernels.ops import Impl, gather, scatter

__all__ = ["BenchShape", "main", "run"]

CPU_KINDS: tuple[LayoutKind, ...] = ("flash_nhd", "flash_hnd", "cpu", "cpu_amx", "mla")


@dataclass(frozen=True)
class BenchShape:
    name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    block_size: int = 16
    num_tokens: int = 256

    def layout(self, kind: LayoutKind) -> KVLayout:
        if kind == "mla":
            # Same bytes per token as the K+V of the attention layouts.
            latent = 2 * self.num_kv_heads * self.head_dim
            return KVLayout(kind, self.block_size, 1, latent, self.dtype)
        return KVLayout(kind, self.block_size, self.num_kv_heads, self.head_dim, self.dtype)


SHAPES = {
    "llama8b": BenchShape("llama8b", 32, 8, 128, torch.bfloat16),
    "tiny": BenchShape("tiny", 2, 2, 32, torch.float32),
}


def _timings(fns: dict[str, Callable[[], None]], iters: int) -> dict[str, list[float]]:
    """Run each fn once to warm up, then ``iters`` rounds interleaving them (so a noisy
    neighbour slows all of them alike); seconds per call."""
    for fn in fns.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    return samples


def pattern_copy(layout: KVLayout, caches: list[torch.Tensor], out: torch.Tensor, n: int) -> None:
    """Copy the first ``n`` blocks of every layer into the chunk ``out`` with one strided
    ``copy_`` per cell view (the layout's element order without the block table)."""
    for layers, cells in layer_groups(layout, caches):
        for kv0, view in cells:
            _, _, t1, t0, _, kv, d1, d0 = view.shape
            part = out[layers, kv0 : kv0 + kv].unflatten(-1, (d1, d0)).movedim(1, 3)
            part.unflatten(1, (n, t1, t0)).copy_(view[:, :n])


def bench_one(
    shape: BenchShape,
    kind: LayoutKind,
    iters: int,
    impl: Impl = "torch",
    blocks: str = "random",
) -> dict[str, Any]:
    """Time gather, scatter and the baselines for one shape and layout kind. ``blocks`` is the
    chunk's block table: "random" (shuffled through a 4x larger cache, the worst case) or
    "consecutive" (what a fresh vLLM allocator hands a new request)."""
    layout = shape.layout(kind)
    n_blocks = -(-shape.num_tokens // shape.block_size)
    pool = 4 * n_blocks  # blocks come from a larger cache, in shuffled order
    gen = torch.Generator().manual_seed(0)
    caches = layout.empty_caches(shape.num_layers, pool)
    for cache in caches:
        cache.normal_(generator=gen)
    if blocks == "consecutive":
        block_ids = torch.arange(n_blocks, 2 * n_blocks)
    else:
        block_ids = torch.randperm(pool, generator=gen)[:n_blocks]
    nbytes = layout.chunk_bytes(shape.num_layers, shape.num_tokens)
    page = torch.empty(nbytes, dtype=torch.uint8)
    out = page.view(layout.dtype).view(layout.chunk_shape(shape.num_layers, shape.num_tokens))
    src = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
    dst = torch.empty(nbytes, dtype=torch.uint8)
    n = shape.num_tokens
    samples = _timings(
        {
            "copy": lambda: dst.copy_(src),  # type: ignore[dict-item]
            "gather": lambda: gather(caches, layout, block_ids, 0, n, out, impl=impl),
            "scatter": lambda: scatter(out, caches, layout, block_ids, 0, n, impl=impl),
            "pattern": lambda: pattern_copy(layout, caches, out, n_blocks),
        },
        iters,
    )
    best = {name: nbytes / min(s) / 1e9 for name, s in samples.items()}
    median = {name: nbytes / statistics.median(s) / 1e9 for name, s in samples.items()}
    return {
        "shape": shape.name,
        "layout": kind,
        "bytes": nbytes,
        # best of the interleaved rounds (least disturbed by the other tenants of the box)
        "copy_gbps": round(best["copy"], 2),
        "gather_gbps": round(best["gather"], 2),
        "scatter_gbps": round(best["scatter"], 2),
        "pattern_gbps": round(best["pattern"], 2),
        "gather_ratio": round(best["gather"] / best["copy"], 3),
        "scatter_ratio": round(best["scatter"] / best["copy"], 3),
        "median_gbps": {name: round(v, 2) for name, v in median.items()},
        "median_gather_ratio": round(median["gather"] / median["copy"], 3),
        "median_scatter_ratio": round(median["scatter"] / median["copy"], 3),
        "pattern_ratio": round(best["pattern"] / best["copy"], 3),
        "gather_vs_pattern": round(best["gather"] / best["pattern"], 3),
        "scatter_vs_pattern": round(best["scatter"] / best["pattern"], 3),
    }


def _fits(shape: BenchShape, kind: LayoutKind) -> bool:
    try:
        shape.layout(kind)
    except LayoutError:
        return False  # e.g. cpu_amx needs a 2-byte dtype; the tiny model is fp32
    return True


def run(
    shapes: list[str], kinds: list[LayoutKind], iters: int, blocks: str = "random"
) -> dict[str, Any]:
    results = [
        bench_one(SHAPES[s], k, iters, blocks=blocks)
        for s in shapes
        for k in kinds
        if _fits(SHAPES[s], k)
    ]
    return {
        "bench": "kernels",
        "torch_threads": torch.get_num_threads(),
        "iters": iters,
        "blocks": blocks,
        "results": results,
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``lmcache-disagg bench kernels``; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="lmcache-disagg bench kernels", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.add_argument("--iters", type=int, default=25, help="timed rounds per measurement")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: keep)")
    parser.add_argument("--shape", choices=sorted(SHAPES), action="append", help="repeatable")
    parser.add_argument("--layout", choices=CPU_KINDS, action="append", help="repeatable")
    parser.add_argument(
        "--blocks",
        choices=("random", "consecutive"),
        default="random",
        help="the chunk's block table: shuffled (worst case, the default) or consecutive ids",
    )
    args = parser.parse_args(argv)
    if args.iters < 1:
        parser.error("--iters must be >= 1")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    report = run(
        args.shape or list(SHAPES), args.layout or list(CPU_KINDS), args.iters, args.blocks
    )
    header = f"{'shape':<8} {'layout':<10} {'MiB':>7} {'copy_':>7} {'gather':>7} {'ratio':>6}"
    print(
        f"{header} {'scatter':>7} {'ratio':>6} {'pattern':>7} {'ratio':>6}   (GB/s, best of "
        f"{report['iters']} rounds; median ratios; torch threads={report['torch_threads']}; "
        f"{report['blocks']} blocks)"
    )
    for r in report["results"]:
        print(
            f"{r['shape']:<8} {r['layout']:<10} {r['bytes'] / 2**20:>7.2f} {r['copy_gbps']:>7.2f} "
            f"{r['gather_gbps']:>7.2f} {r['gather_ratio']:>6.2f} {r['scatter_gbps']:>7.2f} "
            f"{r['scatter_ratio']:>6.2f} {r['pattern_gbps']:>7.2f} {r['pattern_ratio']:>6.2f}   "
            f"median {r['median_gather_ratio']:.2f} / "
            f"{r['median_scatter_ratio']:.2f}"
        )
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
