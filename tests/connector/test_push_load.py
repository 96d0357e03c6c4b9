"""Pusher (P) and Loader (D) against the real transfer layer on loopback, with CPU paged caches.

No vLLM here: the tests play the scheduler (metadata) and compare the tokens' K/V in D's blocks
with P's. Failures must end in ``failed_recving`` (recompute), counted by reason, pages freed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from lmcache_disagg.config import LMCacheDisaggConfig, load_config
from lmcache_disagg.connector.device import DONE, Completion, SyncCopyEngine
from lmcache_disagg.connector.kvcache import WorkerKV
from lmcache_disagg.connector.loader import Loader
from lmcache_disagg.connector.logonce import LogOnce
from lmcache_disagg.connector.metadata import (
    LMCacheDisaggMetadata,
    LoadSpec,
    PushProgress,
    PushStart,
)
from lmcache_disagg.connector.pusher import Pusher
from lmcache_disagg.connector.stats import StatsRecorder
from lmcache_disagg.transfer import KVReceiver, KVSender
from lmcache_disagg.transfer.pool import SendPage
from lmcache_disagg.transfer.state import PushState, PushStatus
from tests.connector.utils import make_kv, token_values

LOG = LogOnce(logging.getLogger("test"))
P_BLOCKS = [5, 2, 9, 7, 1, 3, 11, 4, 8]  # 9 blocks of 8 = 72 tokens
D_BLOCKS = [30, 31, 20, 21, 22, 40, 41, 42, 43]


def config(**changes: object) -> LMCacheDisaggConfig:
    base: dict[str, object] = {
        "channel": "tcp", "listen_port": 0, "chunk_size": 16, "pool_size": "1MiB",
        "send_buffer_size": "256KiB", "connect_timeout": 1, "handshake_timeout": 1,
        "reserve_timeout": 0.5, "push_deadline": 5, "load_deadline": 5, "reservation_ttl": 10,
    }  # fmt: skip
    base.update(changes)
    return load_config(overrides=base, environ={})


@dataclass
class Side:
    kv: WorkerKV
    stats: StatsRecorder = field(default_factory=StatsRecorder)


@pytest.fixture
def d_side() -> Iterator[tuple[Side, KVReceiver, Loader]]:
    side = Side(make_kv(seed=2))
    receiver = KVReceiver(config(), side.kv.fingerprint)
    receiver.start()
    loader = Loader(config(), side.kv, receiver, SyncCopyEngine(), side.stats, LOG, receiver.extend)
    try:
        yield side, receiver, loader
    finally:
        loader.shutdown()
        receiver.shutdown()


@pytest.fixture
def p_side() -> Iterator[tuple[Side, KVSender, Pusher]]:
    side = Side(make_kv(seed=1))
    sender = KVSender(config(), side.kv.fingerprint)
    sender.start()
    pusher = Pusher(config(), side.kv, sender, SyncCopyEngine(), side.stats, LOG)
    pusher.start()
    try:
        yield side, sender, pusher
    finally:
        pusher.shutdown()
        sender.shutdown()


PROMPT = list(range(1000, 1070))  # 70 tokens; P pushes 69 = 4 full chunks + 5 tokens


def push(pusher: Pusher, target: str, req: str = "r", prompt: list[int] = PROMPT) -> set[str]:
    """Play P's scheduler: chunked prefill in two steps, then hand over the blocks."""
    tokens = prompt[:-1]
    pusher.on_metadata(
        LMCacheDisaggMetadata(
            push_starts=[PushStart(req, f"tid-{req}", target, tokens)],
            push_progress=[PushProgress(req, P_BLOCKS, 40)],
        )
    )
    pusher.after_forward()
    pusher.on_metadata(
        LMCacheDisaggMetadata(push_progress=[PushProgress(req, P_BLOCKS, len(prompt))])
    )
    pusher.after_forward()
    pusher.on_metadata(LMCacheDisaggMetadata(push_finished=[req]))
    deadline = time.monotonic() + 10
    finished: set[str] = set()
    while not finished and time.monotonic() < deadline:
        pusher.after_forward()
        finished = pusher.take_finished()
        time.sleep(0.005)
    return finished


def load(loader: Loader, spec: LoadSpec, timeout: float = 10) -> tuple[set[str], set[str]]:
    loader.on_metadata(LMCacheDisaggMetadata(loads=[spec]))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, failed = loader.poll(set())
        if done:
            return done, failed
        time.sleep(0.005)
    raise AssertionError("load never settled")


def spec(req: str = "r", start: int = 0, end: int = 69, tokens: list[int] = PROMPT) -> LoadSpec:
    return LoadSpec(req, f"tid-{req}", D_BLOCKS, start, end, 69, tokens[:end])


def test_pushed_chunks_land_in_ds_blocks(p_side, d_side) -> None:  # type: ignore[no-untyped-def]
    p, sender, pusher = p_side
    d, receiver, loader = d_side
    assert push(pusher, receiver.endpoint) == {"r"}
    before = token_values(d.kv, D_BLOCKS, 69, 72)
    assert load(loader, spec()) == ({"r"}, set())
    assert token_values(d.kv, D_BLOCKS, 0, 69).equal(token_values(p.kv, P_BLOCKS, 0, 69))
    # The last prompt token's slot (and beyond) was not touched: D computes it.
    assert token_values(d.kv, D_BLOCKS, 69, 72).equal(before)
    assert receiver.occupancy() == 0 and sender.send_pool.in_use() == 0
    stats = d.stats.snapshot()
    assert stats["c:tokens_loaded"] == 69 and stats["g:pool_pages_used"] == 0
    assert p.stats.snapshot()["c:tokens_pushed"] == 69


def test_a_local_prefix_hit_loads_only_the_rest(p_side, d_side) -> None:  # type: ignore[no-untyped-def]
    p, _, pusher = p_side
    d, receiver, loader = d_side
    push(pusher, receiver.endpoint)
    untouched = token_values(d.kv, D_BLOCKS, 0, 24)
    assert load(loader, spec(start=24)) == ({"r"}, set())
    assert token_values(d.kv, D_BLOCKS, 0, 24).equal(untouched)
    assert token_values(d.kv, D_BLOCKS, 24, 69).equal(token_values(p.kv, P_BLOCKS, 24, 69))


def test_a_different_prompt_is_never_loaded(p_side, d_side) -> None:  # type: ignore[no-untyped-def]
    _, _, pusher = p_side
    d, receiver, loader = d_side
    push(pusher, receiver.endpoint)
    other = [*PROMPT[:20], 7, *PROMPT[21:]]
    before = token_values(d.kv, D_BLOCKS, 0, 69)
    assert load(loader, spec(tokens=other)) == ({"r"}, {"r"})
    assert token_values(d.kv, D_BLOCKS, 0, 69).equal(before)
    assert d.stats.snapshot()["c:fallbacks:key_mismatch"] == 1
    assert receiver.occupancy() == 0


def test_unknown_transfer_falls_back_after_the_grace(d_side) -> None:  # type: ignore[no-untyped-def]
    d, _, loader = d_side
    started = time.monotonic()
    assert load(loader, spec(req="never")) == ({"never"}, {"never"})
    assert time.monotonic() - started < 10 * 1.5  # grace = connect + reserve timeouts
    assert d.stats.snapshot()["c:fallbacks:unknown_transfer"] == 1


def test_abort_while_waiting_releases_everything(p_side, d_side) -> None:  # type: ignore[no-untyped-def]
    _, _, pusher = p_side
    d, receiver, loader = d_side
    push(pusher, receiver.endpoint)
    assert receiver.occupancy() > 0
    loader.on_metadata(LMCacheDisaggMetadata(loads=[spec()]))
    assert loader.poll({"r"}) == ({"r"}, {"r"})
    assert receiver.occupancy() == 0
    assert d.stats.snapshot()["c:fallbacks:aborted"] == 1


def test_release_of_an_unloaded_transfer(p_side, d_side) -> None:  # type: ignore[no-untyped-def]
    _, _, pusher = p_side
    _, receiver, loader = d_side
    push(pusher, receiver.endpoint)
    loader.on_metadata(LMCacheDisaggMetadata(releases=["tid-r"]))
    assert receiver.occupancy() == 0


def test_unreachable_target_still_frees_ps_blocks(p_side) -> None:  # type: ignore[no-untyped-def]
    p, sender, pusher = p_side
    from lmcache_disagg.vllm_server import free_port

    assert push(pusher, f"127.0.0.1:{free_port()}") == {"r"}
    assert sender.send_pool.in_use() == 0
    assert sum(v for k, v in p.stats.snapshot().items() if k.startswith("c:push_failures")) == 1


def test_disallowed_target_is_refused(p_side) -> None:  # type: ignore[no-untyped-def]
    p, _, pusher = p_side
    assert push(pusher, "10.255.255.1:17555") == {"r"}
    assert p.stats.snapshot()["c:push_failures:target_not_allowed"] == 1


def test_pool_too_small_is_a_counted_fallback(p_side) -> None:  # type: ignore[no-untyped-def]
    p, _, pusher = p_side
    d = Side(make_kv(seed=2))
    small = config(pool_size=2 * d.kv.fingerprint.page_bytes)
    receiver = KVReceiver(small, d.kv.fingerprint)
    receiver.start()
    loader = Loader(small, d.kv, receiver, SyncCopyEngine(), d.stats, LOG)
    try:
        assert push(pusher, receiver.endpoint) == {"r"}
        assert p.stats.snapshot()["c:push_failures:no_room"] == 1
        assert load(loader, spec()) == ({"r"}, {"r"})
        assert receiver.occupancy() == 0
    finally:
        receiver.shutdown()


class _Deferred:
    """A GPU-like completion: done only after ``polls`` queries."""

    def __init__(self, polls: int) -> None:
        self.polls = polls

    def done(self) -> bool:
        self.polls -= 1
        return self.polls < 0

    def wait(self) -> None:
        self.polls = -1


class _DeferredEngine:
    def __init__(self) -> None:
        self.completions: list[_Deferred] = []

    def submit(self, copy) -> Completion:  # type: ignore[no-untyped-def]
        copy()
        completion = _Deferred(3)
        self.completions.append(completion)
        return completion

    def fence_compute(self, completion: Completion) -> None:
        return None


class _RecordingHandle:
    held = 0

    def __init__(self, log: list[tuple[int, bool]], engine: _DeferredEngine) -> None:
        self.log, self.engine = log, engine

    def write(self, index: int, page: SendPage, nbytes: int, num_tokens: int, key: bytes) -> None:
        # The transfer layer may read the page only once its gather has completed.
        self.log.append((index, self.engine.completions[index].polls < 0))

    def finish(self) -> None:
        self.log.append((-1, True))

    def cancel(self) -> None:
        return None

    def status(self) -> PushStatus:
        return PushStatus(PushState.DONE)


class _RecordingSender:
    def __init__(self, engine: _DeferredEngine, page_bytes: int) -> None:
        import torch

        self.log: list[tuple[int, bool]] = []
        self.engine = engine
        self._pages = [SendPage(i, torch.zeros(page_bytes, dtype=torch.uint8)) for i in range(8)]

    def open(
        self, target: str, transfer_id: str, n_chunks: int, keys: object = ()
    ) -> _RecordingHandle:
        return _RecordingHandle(self.log, self.engine)

    def acquire_page(self, timeout: float) -> SendPage:
        return self._pages.pop()

    def _release_page(self, page: SendPage) -> None:
        self._pages.append(page)


def test_pages_are_handed_over_only_after_their_gather_completed() -> None:
    kv = make_kv(seed=1)
    engine = _DeferredEngine()
    sender = _RecordingSender(engine, kv.fingerprint.page_bytes)
    pusher = Pusher(config(), kv, sender, engine, StatsRecorder(), LOG)  # type: ignore[arg-type]
    pusher.start()
    try:
        assert push(pusher, "127.0.0.1:1") == {"r"}
    finally:
        pusher.shutdown()
    writes = [entry for entry in sender.log if entry[0] >= 0]
    assert [index for index, _ in writes] == [0, 1, 2, 3, 4]
    assert all(ready for _, ready in writes)
    assert sender.log[-1] == (-1, True)
    assert DONE.done()
