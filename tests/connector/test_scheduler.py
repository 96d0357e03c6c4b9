"""The scheduler half: what P pushes, what D loads, and the last prompt token rule."""

from __future__ import annotations

from typing import Any

import pytest

from lmcache_disagg.config import load_config
from lmcache_disagg.connector.params import LoadParams, PushParams, decode_params_for
from lmcache_disagg.connector.scheduler import ConnectorScheduler, plan_load
from lmcache_disagg.kv_params import NUM_TOKENS, PROMPT_TOKEN_IDS, TRANSFER_ID
from tests.connector.utils import CHUNK, FakeRequest, FakeSchedulerOutput, Status, p_request

BLOCKS: dict[str, list[int]] = {}


def scheduler(producer: bool, consumer: bool) -> ConnectorScheduler:
    return ConnectorScheduler(
        load_config(overrides={"chunk_size": CHUNK}, environ={}),
        is_producer=producer,
        is_consumer=consumer,
        block_ids_of=lambda req_id: BLOCKS.setdefault(req_id, [3, 1, 4, 1, 5, 9, 2, 6]),
    )


def load_params(prompt: list[int], pushed: int) -> LoadParams:
    return LoadParams("t", pushed, tuple(prompt), "127.0.0.1:1")


@pytest.mark.parametrize(
    ("prompt_len", "pushed", "d_prompt_len", "expected"),
    [
        (40, 39, 40, 39),  # normal: all pushed tokens, never the last prompt token
        (32, 31, 32, 31),  # pushed ends mid-chunk (partial last chunk is usable)
        (17, 16, 17, 16),
        (2, 1, 2, 1),
        (40, 39, 39, 32),  # D's prompt shorter: only whole chunks, and not its last token
        (40, 39, 16, 0),  # a one-chunk D prompt: the last token must be computed -> 0 chunks
    ],
)
def test_plan_load(prompt_len: int, pushed: int, d_prompt_len: int, expected: int) -> None:
    prompt = list(range(prompt_len))
    assert plan_load(load_params(prompt, pushed), prompt[:d_prompt_len], CHUNK) == expected


def test_plan_load_stops_at_the_first_differing_chunk() -> None:
    prompt = list(range(40))
    d_prompt = [*prompt[:20], 999, *prompt[21:]]
    assert plan_load(load_params(prompt, 39), d_prompt, CHUNK) == 16


def test_p_flow_push_then_hand_over_the_blocks() -> None:
    sched = scheduler(producer=True, consumer=False)
    req = p_request("r1", 40)
    sched.update_state_after_alloc(req, 0)
    # Step 1: chunked prefill computes 24 tokens.
    meta = sched.build_connector_meta(FakeSchedulerOutput({"r1": 24}))
    assert [s.transfer_id for s in meta.push_starts] == ["tid-r1"]
    assert meta.push_starts[0].token_ids == req.prompt_token_ids[:39]
    assert [(p.req_id, p.computed_end) for p in meta.push_progress] == [("r1", 24)]
    req.num_computed_tokens = 24
    # Step 2: the rest; the start is not repeated.
    meta = sched.build_connector_meta(FakeSchedulerOutput({"r1": 16}))
    assert meta.push_starts == [] and meta.push_progress[0].computed_end == 40
    req.num_computed_tokens, req.status = 40, Status.FINISHED_LENGTH_CAPPED
    keep, params = sched.request_finished(req)  # type: ignore[arg-type]
    assert keep is True and params is not None
    assert params[NUM_TOKENS] == 39 and params[PROMPT_TOKEN_IDS] == req.prompt_token_ids
    assert params[TRANSFER_ID] == "tid-r1"
    meta = sched.build_connector_meta(FakeSchedulerOutput())
    assert meta.push_finished == ["r1"] and not meta.step_has_work


def test_p_abort_mid_prefill_cancels_and_frees() -> None:
    sched = scheduler(producer=True, consumer=False)
    req = p_request("r2", 40)
    sched.update_state_after_alloc(req, 0)
    sched.build_connector_meta(FakeSchedulerOutput({"r2": 16}))
    req.num_computed_tokens, req.status = 16, Status.FINISHED_ABORTED
    assert sched.request_finished(req) == (False, None)  # type: ignore[arg-type]
    assert sched.build_connector_meta(FakeSchedulerOutput()).push_cancelled == ["r2"]


def test_p_preemption_resets_progress() -> None:
    sched = scheduler(producer=True, consumer=False)
    req = p_request("r3", 40)
    sched.update_state_after_alloc(req, 0)
    sched.build_connector_meta(FakeSchedulerOutput({"r3": 16}))
    meta = sched.build_connector_meta(FakeSchedulerOutput(preempted_req_ids={"r3"}))
    assert [(p.computed_end, p.block_ids) for p in meta.push_progress] == [(0, [])]


def test_p_one_token_prompt_pushes_nothing() -> None:
    sched = scheduler(producer=True, consumer=False)
    req = p_request("r4", 1)
    sched.update_state_after_alloc(req, 0)
    assert sched.build_connector_meta(FakeSchedulerOutput({"r4": 1})).push_starts == []
    req.num_computed_tokens, req.status = 1, Status.FINISHED_LENGTH_CAPPED
    keep, params = sched.request_finished(req)  # type: ignore[arg-type]
    assert keep is False and params is not None and params[NUM_TOKENS] == 0


def test_p_ignores_requests_without_our_fields() -> None:
    sched = scheduler(producer=True, consumer=False)
    req = FakeRequest("r5", [1, 2, 3], {"do_remote_decode": True, "remote_host": "x"})
    sched.update_state_after_alloc(req, 0)  # type: ignore[arg-type]
    assert sched.build_connector_meta(FakeSchedulerOutput({"r5": 3})).is_empty()
    assert sched.request_finished(req) == (False, None)  # type: ignore[arg-type]


def d_request(req_id: str, prompt: list[int], pushed: int) -> FakeRequest:
    params: dict[str, Any] = decode_params_for(
        PushParams(f"tid-{req_id}", "127.0.0.1:1"), prompt, pushed
    )
    return FakeRequest(req_id, list(prompt), params, status=Status.WAITING_FOR_REMOTE_KVS)


def test_d_flow_loads_all_but_the_last_token() -> None:
    sched = scheduler(producer=False, consumer=True)
    prompt = list(range(100, 140))
    req = d_request("d1", prompt, 39)
    assert sched.get_num_new_matched_tokens(req, 0) == (39, True)  # type: ignore[arg-type]
    assert sched.get_num_new_matched_tokens(req, 16) == (23, True)  # type: ignore[arg-type]
    sched.update_state_after_alloc(req, 23)  # type: ignore[arg-type]
    meta = sched.build_connector_meta(FakeSchedulerOutput())
    (spec,) = meta.loads
    assert (spec.load_start, spec.load_end, spec.num_pushed) == (16, 39, 39)
    assert spec.token_ids == prompt[:39] and spec.transfer_id == "tid-d1"
    # Asked again after the load: nothing more to load, no second spec.
    assert sched.get_num_new_matched_tokens(req, 39) == (0, False)  # type: ignore[arg-type]
    sched.update_state_after_alloc(req, 0)  # type: ignore[arg-type]
    assert sched.build_connector_meta(FakeSchedulerOutput()).loads == []


def test_d_request_finished_before_loading_releases_the_push() -> None:
    sched = scheduler(producer=False, consumer=True)
    req = d_request("d2", list(range(40)), 39)
    sched.get_num_new_matched_tokens(req, 0)  # type: ignore[arg-type]
    req.status = Status.FINISHED_ABORTED
    assert sched.request_finished(req) == (False, None)  # type: ignore[arg-type]
    assert sched.build_connector_meta(FakeSchedulerOutput()).releases == ["tid-d2"]


def test_d_local_prefix_hit_covering_everything_loads_nothing() -> None:
    sched = scheduler(producer=False, consumer=True)
    req = d_request("d3", list(range(40)), 39)
    assert sched.get_num_new_matched_tokens(req, 40) == (0, False)  # type: ignore[arg-type]
    sched.update_state_after_alloc(req, 0)  # type: ignore[arg-type]
    sched.request_finished(req)  # type: ignore[arg-type]
    assert sched.build_connector_meta(FakeSchedulerOutput()).releases == ["tid-d3"]


def test_d_bad_params_mean_recompute() -> None:
    sched = scheduler(producer=False, consumer=True)
    req = d_request("d4", list(range(40)), 39)
    assert req.kv_transfer_params is not None
    req.kv_transfer_params[NUM_TOKENS] = 41
    assert sched.get_num_new_matched_tokens(req, 0) == (0, False)  # type: ignore[arg-type]
