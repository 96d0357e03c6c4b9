"""The scheduler's cache half: what it offers vLLM, when it releases leases, what it stores."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from lmcache_disagg.config import load_config
from lmcache_disagg.connector.cache_plan import CachePlanner
from lmcache_disagg.connector.lookup import (
    LookupAnswer,
    LookupClient,
    LookupServer,
    lookup_address,
)
from lmcache_disagg.connector.metadata import LMCacheDisaggMetadata
from lmcache_disagg.connector.params import PushParams, decode_params_for
from lmcache_disagg.connector.protocol import PROTOCOL_VERSION, LookupRequest
from lmcache_disagg.connector.scheduler import ConnectorScheduler
from lmcache_disagg.connector.stats import StatsRecorder
from tests.connector.utils import CHUNK, FakeRequest, FakeSchedulerOutput

BLOCKS = [5, 6, 7, 8, 9, 10]


class Worker:
    """A lookup server whose store "holds" ``held`` leading tokens of every prompt."""

    def __init__(self) -> None:
        self.held = 0
        self.requests: list[LookupRequest] = []

    def answer(self, request: LookupRequest) -> LookupAnswer:
        self.requests.append(request)
        held = min(self.held, len(request.token_ids))
        return LookupAnswer(held, (("l1", min(held, 16)), ("l2", max(0, held - 16))))


@pytest.fixture
def setup() -> Iterator[tuple[ConnectorScheduler, Worker]]:
    worker = Worker()
    address = lookup_address(f"plan-{uuid.uuid4()}", 0)
    server = LookupServer(address, worker.answer)
    server.start()
    planner = CachePlanner(
        LookupClient([address], timeout=5.0),
        block_size=8,
        save_decode_cache=False,
        block_ids_of=lambda req_id: BLOCKS,
        stats=StatsRecorder(),
    )
    sched = ConnectorScheduler(
        load_config(overrides={"chunk_size": CHUNK}, environ={}),
        is_producer=True,
        is_consumer=True,
        block_ids_of=lambda req_id: BLOCKS,
        cache=planner,
    )
    try:
        yield sched, worker
    finally:
        planner.close()
        server.shutdown()


def test_offers_only_tokens_beyond_vllms_own_and_never_the_last(
    setup: tuple[ConnectorScheduler, Worker],
) -> None:
    sched, worker = setup
    worker.held = 40
    req = FakeRequest("r1", list(range(40)))
    assert sched.get_num_new_matched_tokens(req, 8) == (31, True)
    assert worker.requests[0].max_tokens == 39
    # Asked again while waiting: the same plan, no second lookup.
    assert sched.get_num_new_matched_tokens(req, 8) == (31, True)
    assert len(worker.requests) == 1
    sched.update_state_after_alloc(req, 31)
    meta = sched.build_connector_meta(FakeSchedulerOutput({}))
    [load] = meta.cache_loads
    assert (load.req_id, load.load_start, load.load_end, load.block_ids) == ("r1", 8, 39, BLOCKS)
    # vLLM's per-source metric: tokens 8..16 came from RAM, 16..39 from disk.
    assert sched.hit_sources(req, 31) == {"l1": 8, "l2": 23}
    assert meta.cache_releases == []


def test_unused_lookups_release_their_lease(setup: tuple[ConnectorScheduler, Worker]) -> None:
    sched, worker = setup
    worker.held = 16
    # vLLM's prefix cache already has more: nothing offered, the lease is released.
    req = FakeRequest("r2", list(range(40)))
    assert sched.get_num_new_matched_tokens(req, 24) == (0, False)
    # vLLM scheduled it without the load (e.g. no room): released too.
    req3 = FakeRequest("r3", list(range(40)))
    assert sched.get_num_new_matched_tokens(req3, 0) == (16, True)
    sched.update_state_after_alloc(req3, 0)
    meta = sched.build_connector_meta(FakeSchedulerOutput({}))
    assert len(meta.cache_releases) == 2
    assert meta.cache_loads == []
    # A planned lookup of a request that finishes before it is scheduled is released as well.
    req4 = FakeRequest("r4", list(range(40)))
    assert sched.get_num_new_matched_tokens(req4, 0) == (16, True)
    sched.request_finished(req4)
    assert len(sched.build_connector_meta(FakeSchedulerOutput({})).cache_releases) == 1


def test_pushed_kv_goes_the_push_path_not_the_cache(
    setup: tuple[ConnectorScheduler, Worker],
) -> None:
    sched, worker = setup
    worker.held = 40
    prompt = list(range(40))
    params = decode_params_for(PushParams("tid-r5", "127.0.0.1:1"), prompt, 39)
    req = FakeRequest("r5", prompt, params)
    assert sched.get_num_new_matched_tokens(req, 0) == (39, True)
    assert worker.requests == []


def test_prompt_chunks_are_stored_as_they_complete(
    setup: tuple[ConnectorScheduler, Worker],
) -> None:
    sched, _ = setup
    req = FakeRequest("r6", list(range(40)))
    assert sched.get_num_new_matched_tokens(req, 0) == (0, False)
    sched.update_state_after_alloc(req, 0)
    meta = sched.build_connector_meta(FakeSchedulerOutput({"r6": 24}))
    [first] = meta.store_progress
    assert (first.new_token_ids, first.computed_end, first.final) == (list(range(40)), 24, False)
    req.num_computed_tokens = 24
    [second] = sched.build_connector_meta(FakeSchedulerOutput({"r6": 16})).store_progress
    assert (second.new_token_ids, second.computed_end, second.final) == ([], 40, True)
    req.num_computed_tokens = 40
    assert sched.build_connector_meta(FakeSchedulerOutput({"r6": 1})).store_progress == []
    sched.request_finished(req)
    assert sched.build_connector_meta(FakeSchedulerOutput({})).store_dropped == []


def test_with_tp_the_answer_is_the_minimum_over_ranks() -> None:
    answers = [40, 24]
    servers = []
    addresses = [lookup_address(f"tp-{uuid.uuid4()}", rank) for rank in range(2)]
    for rank, address in enumerate(addresses):
        server = LookupServer(address, lambda request, n=answers[rank]: LookupAnswer(n))
        server.start()
        servers.append(server)
    client = LookupClient(addresses, timeout=5.0)
    try:
        request = LookupRequest(PROTOCOL_VERSION, "r#1", list(range(48)), 47, 8)
        assert client.lookup(request).num_tokens == 24
    finally:
        client.close()
        for server in servers:
            server.shutdown()


def test_save_decode_cache_sends_the_decoded_tokens_too() -> None:
    planner = CachePlanner(
        LookupClient([lookup_address(f"none-{uuid.uuid4()}", 0)], timeout=0.1),
        block_size=8,
        save_decode_cache=True,
        block_ids_of=lambda req_id: BLOCKS,
        stats=StatsRecorder(),
    )
    try:
        req = FakeRequest("d1", list(range(20)))
        req.all_token_ids = [*range(20), 900, 901]  # type: ignore[attr-defined]
        meta = LMCacheDisaggMetadata()
        planner.after_alloc(req, 0, meta)
        planner.progress(FakeSchedulerOutput({"d1": 20}), meta)
        req.num_computed_tokens = 20
        planner.progress(FakeSchedulerOutput({"d1": 1}), meta)
        req.num_computed_tokens = 21
        planner.progress(FakeSchedulerOutput({"d1": 1}), meta)
        sent = [p.new_token_ids for p in meta.store_progress]
        assert sent == [list(range(20)), [900], [901]]
        assert not any(p.final for p in meta.store_progress)
        planner.finished(req, meta)
        assert meta.store_dropped == ["d1"]
    finally:
        planner.close()
