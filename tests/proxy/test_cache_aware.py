"""The cache_aware policy: choice by cached prefix vs load, tie-break, imbalance bound, skipping P,
and a stale index (fed by real publishers over ZMQ)."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from lmcache_disagg.keys import chain_root, chunk_keys
from lmcache_disagg.proxy.cache_aware import (
    CacheAwarePolicy,
    CacheAwareSettings,
    Candidate,
    choose,
)
from lmcache_disagg.proxy.kvevents import EventSource, KVEventSubscriber
from lmcache_disagg.proxy.kvindex import KVIndex
from lmcache_disagg.proxy.kvsync import SyncSettings
from lmcache_disagg.transfer.event_publisher import KVEventPublisher, PublisherSettings
from lmcache_disagg.transfer.events import ChunkEvicted, ChunkStored
from lmcache_disagg.transfer.protocol import LayoutFingerprint

FP = LayoutFingerprint(
    model="m", dtype="float32", num_layers=2, num_kv_heads=2, head_dim=8, chunk_size=16,
    tp_rank=0, tp_size=1,
)  # fmt: skip
PROMPT = list(range(1000, 1160))  # 10 chunks
KEYS = chunk_keys(chain_root(FP), PROMPT, FP.chunk_size)
NO_SKIP = CacheAwareSettings(skip_prefill_chunks=None)


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_longest_prefix_wins_against_a_little_load() -> None:
    cands = [Candidate("a", 100, 0), Candidate("b", 300, 128)]
    assert choose(cands, 160, NO_SKIP).name == "b"  # 32 + 0.25*300 < 160 + 0.25*100
    heavy = [Candidate("a", 100, 0), Candidate("b", 2000, 128)]
    assert choose(heavy, 160, NO_SKIP).name == "a", "load outweighs a small cached prefix"


def test_tie_break_is_documented_order() -> None:
    # Equal cost: more cached tokens first ...
    s = CacheAwareSettings(load_weight=1.0, skip_prefill_chunks=None)
    assert choose([Candidate("a", 64, 0), Candidate("b", 0, 64)], 160, s).name == "b"
    # ... then fewer outstanding tokens (equal cost and cache needs load_weight 0) ...
    z = CacheAwareSettings(load_weight=0.0, skip_prefill_chunks=None)
    assert choose([Candidate("a", 50, 0), Candidate("b", 10, 0)], 160, z).name == "b"
    # ... then a rendezvous hash of the prompt's key: stable per prompt, spread over prompts.
    idle = [Candidate(n, 0, 0) for n in ("a", "b", "c")]
    picks = {choose(idle, 160, z, tie_key=bytes([i]) * 16).name for i in range(64)}
    assert picks == {"a", "b", "c"}
    assert len({choose(idle, 160, z, tie_key=KEYS[-1]).name for _ in range(5)}) == 1


def test_imbalance_bound_keeps_a_hot_prefix_from_melting_one_worker() -> None:
    s = CacheAwareSettings(
        imbalance_ratio=2.0, imbalance_slack_tokens=100, skip_prefill_chunks=None
    )
    # b holds everything, but is beyond 2 x 50 + 100 outstanding tokens: not eligible.
    cands = [Candidate("a", 50, 0), Candidate("b", 201, 160)]
    assert choose(cands, 160, s).name == "a"
    cands = [Candidate("a", 50, 0), Candidate("b", 200, 160)]
    assert choose(cands, 160, s).name == "b"
    assert choose([], 160, s) is None


@pytest.mark.parametrize(
    "bad",
    [
        {"load_weight": -1},
        {"load_weight": float("nan")},
        {"imbalance_ratio": 0.5},
        {"imbalance_slack_tokens": -1},
        {"skip_prefill_chunks": -1},
    ],
)
def test_bad_settings_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        CacheAwareSettings(**bad).validate()  # type: ignore[arg-type]


def test_plan_picks_d_and_p_by_what_they_hold_and_counts_reasons() -> None:
    index = KVIndex()
    index.apply("d0", FP, [ChunkStored(KEYS[:2], "l1")])
    index.apply("d1", FP, [ChunkStored(KEYS[:6], "l2")])
    index.apply("p0", FP, [ChunkStored(KEYS[:1], "l1")])
    index.apply("p1", FP, [ChunkStored(KEYS[:5], "l1")])
    policy = CacheAwarePolicy(index, CacheAwareSettings(skip_prefill_chunks=2))
    plan = policy.plan(PROMPT, [("d0", 0), ("d1", 0)], [("p0", 0), ("p1", 0)])
    assert plan is not None
    assert (plan.decode, plan.prefill, plan.reason) == ("d1", "p1", "disaggregated")
    assert (plan.predicted_decode_hit_tokens, plan.predicted_prefill_hit_tokens) == (96, 80)
    # D now holds all but 2 chunks: P is skipped, D computes the rest.
    index.apply("d1", FP, [ChunkStored(KEYS[6:8], "l1")])
    plan = policy.plan(PROMPT, [("d0", 0), ("d1", 0)], [("p0", 0), ("p1", 0)])
    assert plan is not None and (plan.decode, plan.prefill) == ("d1", None)
    assert plan.reason == "cached_on_decode"
    # No P at all: D alone, counted.
    plan = policy.plan(list(range(5000, 5100)), [("d0", 0)], [])
    assert plan is not None and plan.reason == "no_prefill_worker"
    assert policy.plan(PROMPT, [], [("p0", 0)]) is None
    assert policy.counts.by_reason == {
        "disaggregated": 1, "cached_on_decode": 1, "no_prefill_worker": 1,
    }  # fmt: skip
    assert policy.counts.requests == 3 and policy.counts.predicted_hit_tokens == 96 + 128
    # An unknown worker (no events yet) is predicted to hold nothing.
    assert policy.cached_tokens("d9", PROMPT) == 0


def test_nothing_cached_never_skips_p() -> None:
    policy = CacheAwarePolicy(KVIndex(), CacheAwareSettings(skip_prefill_chunks=100))
    plan = policy.plan(PROMPT, [("d0", 0)], [("p0", 0)])
    assert plan is not None and plan.prefill == "p0" and plan.reason == "disaggregated"


def test_stale_index_routes_to_the_stale_worker_until_the_eviction_arrives() -> None:
    """d0 evicts chunks but its eviction is not published yet: the index still routes there (the
    worker's own store then recomputes; slower, not wrong). The eviction event corrects it."""
    settings = PublisherSettings("tcp://127.0.0.1:0", heartbeat_interval=0.1)
    pubs = {
        name: KVEventPublisher(settings, FP, publisher_id=name).start() for name in ("d0", "d1")
    }
    index = KVIndex()
    sub = KVEventSubscriber(
        [EventSource(n, p.endpoint, p.snapshot_endpoint) for n, p in pubs.items()],
        index,
        SyncSettings(min_expiry=0.3),
        poll_interval=0.01,
    ).start()
    try:
        policy = CacheAwarePolicy(index, NO_SKIP)
        pubs["d0"].stored(KEYS, "l1")
        pubs["d1"].stored(KEYS[:4], "l1")
        assert wait_until(lambda: policy.cached_tokens("d0", PROMPT) == 160)
        assert wait_until(lambda: policy.cached_tokens("d1", PROMPT) == 64)
        # d0 evicts chunks 1..9; the events are still on their way, so the index is stale.
        worker_cache = set(KEYS[:1])
        plan = policy.plan(PROMPT, [("d0", 0), ("d1", 0)], [])
        assert plan is not None and plan.decode == "d0"
        actual = next(i for i, key in enumerate(KEYS) if key not in worker_cache) * FP.chunk_size
        assert plan.predicted_decode_hit_tokens == 160 and actual == 16, "predicted > actual"
        pubs["d0"].evicted(KEYS[1:], "l1")
        assert wait_until(lambda: policy.cached_tokens("d0", PROMPT) == 16)
        plan = policy.plan(PROMPT, [("d0", 0), ("d1", 0)], [])
        assert plan is not None and plan.decode == "d1"
    finally:
        sub.close()
        for pub in pubs.values():
            pub.close()


def test_index_events_and_fingerprints_apply_to_plans() -> None:
    index = KVIndex()
    other = LayoutFingerprint(
        model="other", dtype="float32", num_layers=2, num_kv_heads=2, head_dim=8, chunk_size=16,
        tp_rank=0, tp_size=1,
    )  # fmt: skip
    # d1 serves another model: the same tokens hash to other keys, so its entries never match.
    index.apply("d0", FP, [ChunkStored(KEYS[:3], "l1")])
    index.apply("d1", other, [ChunkStored(KEYS, "l1")])
    policy = CacheAwarePolicy(index, NO_SKIP)
    assert policy.cached_tokens("d0", PROMPT) == 48 and policy.cached_tokens("d1", PROMPT) == 0
    index.apply("d0", FP, [ChunkEvicted(KEYS[:1], "l1")])
    assert policy.cached_tokens("d0", PROMPT) == 0
