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


def _split(raw: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(raw) + 1) for c in cuts})
    return [raw[a:b] for a, b in zip([0, *points], [*points, len(raw)], strict=True)]


@settings(max_examples=300, deadline=None)
@given(n_tokens=st.integers(0, 6), cuts=st.lists(st.integers(0, 4000), max_size=12))
def test_injected_usage_event_is_stripped_at_any_boundary(n_tokens: int, cuts: list[int]) -> None:
    """cache_aware asked D for usage on the client's behalf: the relay reads D's cached_tokens and
    drops the usage-only event; every other byte is D's, however the reads split the events."""
    usage = {"prompt_tokens": 8, "completion_tokens": n_tokens,
             "prompt_tokens_details": {"cached_tokens": 5}}  # fmt: skip
    raw = _stream(n_tokens, usage)
    usage_event = b"data: " + json.dumps({"id": "x", "choices": [], "usage": usage}).encode()
    without = raw.replace(usage_event + b"\n\n", b"")
    assert without != raw
    patcher = SSEUsagePatcher(None, None, strip_usage_event=True)
    out = [patcher.feed(piece) for piece in _split(raw, cuts)]
    assert b"".join(out) + patcher.flush() == without
    assert patcher.reported_cached == 5
    # Nothing but an unfinished event is held back: after each read, what went out is everything
    # up to the last complete event (less the dropped one).
    sent, seen = b"", b""
    for piece, chunk in zip(_split(raw, cuts), out, strict=True):
        seen += piece
        sent += chunk
        done = seen[: seen.rfind(b"\n\n") + 2] if b"\n\n" in seen else b""
        assert sent == done.replace(usage_event + b"\n\n", b"")


def test_reading_usage_leaves_the_stream_untouched() -> None:
    """The client asked for usage and D reported its own cached_tokens (nothing to fix): the
    proxy reads the report, the bytes stay D's, and only a usage-only event is ever stripped."""
    usage = {"prompt_tokens": 8, "completion_tokens": 2, "total_tokens": 11,
             "prompt_tokens_details": {"cached_tokens": 3}}  # fmt: skip
    raw = _stream(2, usage)
    reader = SSEUsagePatcher(None, None)
    assert reader.feed(raw) + reader.flush() == raw  # total_tokens is wrong, but not ours to fix
    assert reader.reported_cached == 3
    # Per-chunk usage (continuous_usage_stats): content events with usage are never dropped.
    chunk = {"id": "x", "choices": [{"index": 0, "text": "a"}], "usage": usage}
    raw = b"data: " + json.dumps(chunk).encode() + b"\n\ndata: [DONE]\n\n"
    stripper = SSEUsagePatcher(None, None, strip_usage_event=True)
    assert stripper.feed(raw[:7]) + stripper.feed(raw[7:]) + stripper.flush() == raw
    assert stripper.reported_cached == 3
    # No usage at all: nothing read.
    silent = SSEUsagePatcher(None, None, strip_usage_event=True)
    raw = _stream(1, {})
    assert silent.feed(raw) == raw.replace(
        b'data: {"id": "x", "choices": [], "usage": {}}\n\n', b""
    )
    assert silent.reported_cached is None
