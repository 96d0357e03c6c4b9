"""Fixing ``usage`` under PD: prompt tokens from the prompt, completions from D, cached tokens.

``cached_tokens`` counts the prompt tokens D did not compute. D's own report wins; when D has none
(e.g. vLLM without ``--enable-prompt-tokens-details``) the proxy uses ``lmcache_num_tokens``, the
count of tokens whose KV P pushed, taken from P's returned ``kv_transfer_params``.

D's own report is also what ``cache_aware`` routing measures its actual hit tokens by
(:func:`cached_tokens_of`), in JSON answers and in the usage event of a stream.
"""

from __future__ import annotations

from typing import Any

import orjson

__all__ = ["SSEUsagePatcher", "cached_tokens_of", "fix_usage", "patch_json_body"]

_USAGE_MARKERS = (b'"usage":{', b'"usage": {')


def cached_tokens_of(usage: Any) -> int | None:
    """``prompt_tokens_details.cached_tokens`` of a usage object, if it has one."""
    details = usage.get("prompt_tokens_details") if isinstance(usage, dict) else None
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return cached if isinstance(cached, int) and not isinstance(cached, bool) else None


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
    """Streaming: re-frames D's SSE bytes on event boundaries and handles the events with usage.

    Its jobs, each optional:

    * fix ``usage`` as :func:`fix_usage` does, when the client asked for usage
      (``stream_options.include_usage``) and ``pushed_tokens`` or ``prefill_prompt_tokens`` is
      known;
    * remember D's own ``cached_tokens`` (:attr:`reported_cached`, from the last event with usage),
      which ``cache_aware`` routing compares with its prediction;
    * with ``strip_usage_event``, drop the usage-only event (``"choices": []`` plus ``usage``):
      the proxy asked D for it and the client did not.

    Only the bytes of an unfinished event are held back (a client cannot use them before the
    event's end either); each feed returns every event it completed, byte for byte as D sent it
    except a fixed or dropped usage event. Without any of the jobs the proxy forwards D's bytes
    untouched instead. Bounded: an event larger than ``max_event`` bytes is passed through
    unparsed.
    """

    __slots__ = ("_fix", "_max_event", "_pending", "_prefill_prompt", "_pushed", "_strip",
                 "reported_cached")  # fmt: skip

    def __init__(
        self,
        pushed_tokens: int | None,
        prefill_prompt_tokens: int | None,
        max_event: int = 1 << 20,
        *,
        strip_usage_event: bool = False,
    ) -> None:
        self._pushed = pushed_tokens
        self._prefill_prompt = prefill_prompt_tokens
        self._fix = pushed_tokens is not None or prefill_prompt_tokens is not None
        self._strip = strip_usage_event
        self._pending = b""
        self._max_event = max_event
        self.reported_cached: int | None = None
        """D's ``cached_tokens`` in the last usage seen so far (None: none reported)."""

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
        # ``ready`` ends with an event's end, so the split's last item is empty and joining the
        # kept items puts every other separator back where it was.
        events = ready.split(b"\n\n")
        kept: list[bytes] = []
        for event in events:
            if event.startswith(b"data: {") and any(m in event for m in _USAGE_MARKERS):
                event = self._usage_event(event)
                if not event:
                    continue
            kept.append(event)
        return b"\n\n".join(kept)

    def _usage_event(self, event: bytes) -> bytes:
        """The event to forward in place of ``event`` (empty: drop it)."""
        try:
            obj = orjson.loads(event[6:])
        except orjson.JSONDecodeError:
            return event
        usage = obj.get("usage") if isinstance(obj, dict) else None
        if not isinstance(usage, dict):
            return event
        cached = cached_tokens_of(usage)
        if cached is not None:
            self.reported_cached = cached
        if self._strip and obj.get("choices") == []:
            return b""
        if self._fix and fix_usage(usage, self._pushed, self._prefill_prompt):
            return b"data: " + orjson.dumps(obj)
        return event
