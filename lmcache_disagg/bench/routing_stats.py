"""What both routing benches (:mod:`.routing`, :mod:`.routing_sim`) report per policy, computed once."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

__all__ = ["parse_range", "policy_figures"]


def policy_figures(
    cached_tokens: int, prompt_tokens: int, ttfts: Sequence[float], per_worker: Sequence[int]
) -> dict[str, Any]:
    """Hit rate (cached / prompt tokens), mean and p90 TTFT in ms, and the load imbalance (most
    requests on one worker / mean requests per worker)."""
    ordered = sorted(ttfts)
    mean_requests = statistics.fmean(per_worker) if per_worker else 0.0
    p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))] if ordered else 0.0
    return {
        "hit_rate": cached_tokens / prompt_tokens if prompt_tokens else 0.0,
        "mean_ttft_ms": 1000 * statistics.fmean(ordered) if ordered else 0.0,
        "p90_ttft_ms": 1000 * p90,
        "load_imbalance": max(per_worker) / mean_requests if mean_requests else 0.0,
        "requests_per_worker": list(per_worker),
    }


def parse_range(text: str) -> tuple[int, int]:
    """``LO,HI`` (or one number for both) -> (LO, HI); argparse reports a ValueError as misuse."""
    lo, _, hi = text.partition(",")
    return int(lo), int(hi or lo)
