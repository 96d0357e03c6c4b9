"""Fixing ``usage`` under PD: prompt tokens from the prompt, completions from D, cached tokens.

``cached_tokens`` counts the prompt tokens D did not compute. D's own report wins; when D has none
(e.g. vLLM without ``--enable-prompt-tokens-details``) the proxy uses ``lmcache_num_tokens``, the
count of tokens whose KV P pushed, taken from P's returned ``kv_transfer_params``.
"""

from __future__ import annotations

from typing import Any

import orjson

__all__ = ["SSEUsagePatcher", "fix_usage", "patch_json_body"]

_USAGE_MARKERS = (b'"usage":{', b'"usage": {')


def fix_usage(usage: Any, pushed_tokens: int | None, prefill_prompt_tokens: int | None) -> bool:
    """Fix one usage object in place; returns whether it changed."""
    if not isinstance(usage, dict):
        return False
    changed = False
    prompt = usage.get("prompt_tokens")
    if not isinstance(prompt, int) and prefill_prompt_tokens is not None:
        usage["prompt_tokens"] = prompt = prefill_prompt_tokens
        changed = True
    details = usage.get("prompt_tokens_details")
    has_report = isinstance(details, dict) and isinstance(details.get("cached_tokens"), int)
    if not has_report and pushed_tokens is not None:
        cached = pushed_tokens if not isinstance(prompt, int) else min(pushed_tokens, prompt)
        new_details = dict(details) if isinstance(details, dict) else {}
        new_details["cached_tokens"] = max(cached, 0)
        usage["prompt_tokens_details"] = new_details
        changed = True
    completion = usage.get("completion_tokens")
    if (
        isinstance(prompt, int)
        and isinstance(completion, int)
        and usage.get("total_tokens") != prompt + completion
    ):
        usage["total_tokens"] = prompt + completion
        changed = True
    return changed


def patch_json_body(
    data: bytes, pushed_tokens: int | None, prefill_prompt_tokens: int | None
) -> bytes:
    """Non-streaming: fix ``usage`` in D's JSON answer (unchanged bytes if nothing to fix)."""
    if pushed_tokens is None and prefill_prompt_tokens is None:
        return data
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return data
    if isinstance(obj, dict) and fix_usage(obj.get("usage"), pushed_tokens, prefill_prompt_tokens):
        return orjson.dumps(obj)
    return data


class SSEUsagePatcher:
    """Streaming: re-frames D's SSE bytes on event boundaries and fixes events carrying usage.

    Only used when the client asked for usage (``stream_options.include_usage``) and there is
    something to fix; otherwise the proxy forwards D's bytes untouched. Bounded: an event larger
    than ``max_event`` bytes is passed through unparsed.
    """

    __slots__ = ("_max_event", "_pending", "_prefill_prompt", "_pushed")

    def __init__(
        self, pushed_tokens: int | None, prefill_prompt_tokens: int | None, max_event: int = 1 << 20
    ) -> None:
        self._pushed = pushed_tokens
        self._prefill_prompt = prefill_prompt_tokens
        self._pending = b""
        self._max_event = max_event

    def feed(self, data: bytes) -> bytes:
        """Bytes that are ready to forward now (whole events only)."""
        buf = self._pending + data if self._pending else data
        end = buf.rfind(b"\n\n")
        if end < 0:
            if len(buf) > self._max_event:
                self._pending = b""
                return buf
            self._pending = buf
            return b""
        ready, self._pending = buf[: end + 2], buf[end + 2 :]
        if any(marker in ready for marker in _USAGE_MARKERS):
            ready = self._patch(ready)
        return ready

    def flush(self) -> bytes:
        rest, self._pending = self._pending, b""
        return rest

    def _patch(self, ready: bytes) -> bytes:
        events = ready.split(b"\n\n")
        for i, event in enumerate(events):
            if not event.startswith(b"data: {") or not any(m in event for m in _USAGE_MARKERS):
                continue
            try:
                obj = orjson.loads(event[6:])
            except orjson.JSONDecodeError:
                continue
            if isinstance(obj, dict) and fix_usage(
                obj.get("usage"), self._pushed, self._prefill_prompt
            ):
                events[i] = b"data: " + orjson.dumps(obj)
        return b"\n\n".join(events)
