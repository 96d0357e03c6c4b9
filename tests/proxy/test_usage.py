"""The usage fixer, including SSE re-framing at arbitrary chunk boundaries."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from lmcache_disagg.proxy.usage import SSEUsagePatcher, fix_usage, patch_json_body
from tests.proxy.utils import sse_events


def _stream(n_tokens: int, usage: dict[str, object]) -> bytes:
    events = [
        {"id": "x", "choices": [{"index": 0, "text": f" t{i}\n\n", "finish_reason": None}]}
        for i in range(n_tokens)
    ]
    events.append({"id": "x", "choices": [], "usage": usage})
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + (
        b"data: [DONE]\n\n"
    )


def test_fix_usage_rules() -> None:
    usage: dict[str, object] = {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 0}
    assert fix_usage(usage, pushed_tokens=10, prefill_prompt_tokens=None)
    assert usage == {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13,
                     "prompt_tokens_details": {"cached_tokens": 10}}  # fmt: skip
    own = {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13,
           "prompt_tokens_details": {"cached_tokens": 4}}  # fmt: skip
    assert not fix_usage(own, pushed_tokens=10, prefill_prompt_tokens=None)
    assert own["prompt_tokens_details"] == {"cached_tokens": 4}  # D's own report wins
    capped = {"prompt_tokens": 5, "completion_tokens": 1}
    fix_usage(capped, pushed_tokens=9, prefill_prompt_tokens=None)
    assert capped["prompt_tokens_details"] == {"cached_tokens": 5}
    missing: dict[str, object] = {"completion_tokens": 2}
    fix_usage(missing, pushed_tokens=None, prefill_prompt_tokens=7)
    assert missing["prompt_tokens"] == 7 and missing["total_tokens"] == 9
    body = b'{"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}'
    assert json.loads(patch_json_body(body, 3, None))["usage"]["prompt_tokens_details"] == {
        "cached_tokens": 3
    }
    assert patch_json_body(b"not json", 3, None) == b"not json"


@settings(max_examples=200, deadline=None)
@given(n_tokens=st.integers(0, 6), cuts=st.lists(st.integers(0, 4000), max_size=12))
def test_sse_patcher_is_boundary_independent(n_tokens: int, cuts: list[int]) -> None:
    raw = _stream(n_tokens, {"prompt_tokens": 8, "completion_tokens": n_tokens})
    points = sorted({c % (len(raw) + 1) for c in cuts})
    pieces = [raw[a:b] for a, b in zip([0, *points], [*points, len(raw)], strict=True)]
    patcher = SSEUsagePatcher(pushed_tokens=8, prefill_prompt_tokens=None)
    out = b"".join(patcher.feed(p) for p in pieces) + patcher.flush()
    events = sse_events(out.decode())
    assert events[-1] == "[DONE]"
    texts = [e["choices"][0]["text"] for e in events[:-2]]
    assert texts == [
        f" t{i}\n\n" for i in range(n_tokens)
    ]  # (JSON-escaped newlines are not event ends)
    usage = events[-2]["usage"]
    assert usage["prompt_tokens_details"] == {"cached_tokens": 8}
    assert usage["total_tokens"] == 8 + n_tokens
