"""kv_transfer_params parsing: everything from the proxy or from P is validated."""

from __future__ import annotations

from typing import Any

import pytest

from lmcache_disagg.connector.errors import ParamsError
from lmcache_disagg.connector.params import (
    PushParams,
    decode_params_for,
    parse_load_params,
    parse_push_params,
)
from lmcache_disagg.kv_params import (
    DO_REMOTE_DECODE,
    DO_REMOTE_PREFILL,
    NUM_TOKENS,
    PROMPT_TOKEN_IDS,
    PUSH_TARGET,
    TRANSFER_ID,
)

P_PARAMS = {DO_REMOTE_DECODE: True, TRANSFER_ID: "tid-1", PUSH_TARGET: "127.0.0.1:17555"}


def test_push_params_round_trip_to_load_params() -> None:
    push = parse_push_params(P_PARAMS)
    assert push == PushParams("tid-1", "127.0.0.1:17555")
    d_params = decode_params_for(push, [5, 6, 7, 8], 3)
    assert d_params[DO_REMOTE_PREFILL] is True and d_params[DO_REMOTE_DECODE] is False
    load = parse_load_params(d_params)
    assert load is not None
    assert (load.transfer_id, load.num_tokens, load.prompt_token_ids) == ("tid-1", 3, (5, 6, 7, 8))


@pytest.mark.parametrize(
    "params",
    [None, {}, {DO_REMOTE_DECODE: False, **{k: v for k, v in P_PARAMS.items() if k != DO_REMOTE_DECODE}},
     # stock NixlConnector pull params are not ours
     {DO_REMOTE_DECODE: True, "remote_host": "h", "remote_port": 1}],
)  # fmt: skip
def test_not_a_push_request(params: dict[str, Any] | None) -> None:
    assert parse_push_params(params) is None


@pytest.mark.parametrize(
    "change",
    [
        {TRANSFER_ID: ""},
        {TRANSFER_ID: "x" * 300},
        {TRANSFER_ID: 5},
        {TRANSFER_ID: "bad\nid"},
        {PUSH_TARGET: "nohost"},
        {PUSH_TARGET: "h:99999"},
        {PUSH_TARGET: ["h", 1]},
    ],
)
def test_malformed_push_params_name_the_field(change: dict[str, Any]) -> None:
    with pytest.raises(ParamsError) as info:
        parse_push_params({**P_PARAMS, **change})
    assert next(iter(change)) in str(info.value)


D_PARAMS = decode_params_for(PushParams("t", "127.0.0.1:1"), [3, 4, 5], 2)


@pytest.mark.parametrize(
    "change",
    [
        {NUM_TOKENS: 4},
        {NUM_TOKENS: -1},
        {NUM_TOKENS: True},
        {NUM_TOKENS: "2"},
        {PROMPT_TOKEN_IDS: "abc"},
        {PROMPT_TOKEN_IDS: [1, -2, 3]},
        {PROMPT_TOKEN_IDS: [1, 2.5, 3]},
        {PROMPT_TOKEN_IDS: [1, True, 3]},
    ],
)
def test_malformed_load_params_are_refused(change: dict[str, Any]) -> None:
    with pytest.raises(ParamsError):
        parse_load_params({**D_PARAMS, **change})


def test_no_remote_prefill_means_no_load() -> None:
    assert parse_load_params({**D_PARAMS, DO_REMOTE_PREFILL: False}) is None
    assert parse_load_params({DO_REMOTE_PREFILL: True, "remote_block_ids": [1]}) is None
