"""Validation of client requests and removal of internal fields.

Called once per request before routing. Anything that is wrong raises ClientRequestError (4xx);
nothing a client sends can make the proxy answer 500.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from lmcache_disagg import kv_params
from lmcache_disagg.proxy.errors import ClientRequestError

__all__ = ["estimate_tokens", "parse_body", "prefix_key", "sanitize_request_id", "strip_internal"]

_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:\-]{1,128}$")
_PREFIX_CHARS = 512
_INT_FIELDS = ("max_tokens", "max_completion_tokens", "n", "min_tokens")


def sanitize_request_id(raw: bytes | None) -> str | None:
    """The client's X-Request-Id if it is short and safe to log/forward, else None."""
    if raw and _REQUEST_ID.match(raw):
        return raw.decode("ascii")
    return None


def _bad_int(body: dict[str, Any], name: str, limit: int) -> None:
    value = body.get(name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ClientRequestError(f"'{name}' must be an integer", param=name)
    minimum = 0 if name == "min_tokens" else 1
    if value < minimum or value > limit:
        raise ClientRequestError(f"'{name}' must be between {minimum} and {limit}", param=name)


def parse_body(raw: bytes, chat: bool, max_tokens_limit: int) -> dict[str, Any]:
    """Parse and check a completions/chat body. Returns the dict (owned by the caller)."""
    if not raw:
        raise ClientRequestError("request body is empty; expected a JSON object")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ClientRequestError(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ClientRequestError("request body must be a JSON object")
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ClientRequestError("'messages' must be a non-empty list", param="messages")
        if not all(isinstance(m, dict) for m in messages):
            raise ClientRequestError("each message must be an object", param="messages")
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            pass
        elif isinstance(prompt, list) and prompt:
            if not (
                all(isinstance(p, str) for p in prompt)
                or all(isinstance(p, int) and not isinstance(p, bool) for p in prompt)
                or all(isinstance(p, list) for p in prompt)
            ):
                raise ClientRequestError(
                    "'prompt' must be a string, a list of strings or a list of token ids",
                    param="prompt",
                )
        else:
            raise ClientRequestError("'prompt' is required", param="prompt")
    for name in _INT_FIELDS:
        _bad_int(body, name, max_tokens_limit)
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise ClientRequestError("'stream' must be a boolean", param="stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise ClientRequestError("'stream_options' must be an object", param="stream_options")
    return body


def strip_internal(body: dict[str, Any]) -> list[str]:
    """Remove the fields a client may never set (e.g. kv_transfer_params); return their names."""
    found = [name for name in kv_params.INTERNAL_REQUEST_FIELDS if name in body]
    for name in found:
        del body[name]
    return found


def is_batch_prompt(body: dict[str, Any]) -> bool:
    """True for a completions request carrying several prompts (a list of strings or of token-id
    lists). vLLM splits it into one engine request per prompt, all sharing one
    ``kv_transfer_params``, so it cannot be disaggregated as one PD pair."""
    prompt = body.get("prompt")
    return isinstance(prompt, list) and len(prompt) > 1 and not isinstance(prompt[0], int)


def _text_of(body: dict[str, Any]) -> str | list[int] | None:
    if "messages" in body:
        parts = []
        for message in body["messages"]:
            content = message.get("content")
            if isinstance(content, str):
                parts.append(content)
            elif isinstance(content, list):
                parts.extend(
                    str(item.get("text", "")) for item in content if isinstance(item, dict)
                )
        return "\n".join(parts)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        prompt = prompt[0]  # a batch of prompts: route and size by the first
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return prompt
    return None


def estimate_tokens(body: dict[str, Any]) -> int:
    """Prompt length in tokens: exact for token-id prompts, ~4 characters per token for text.

    The proxy does not tokenize (it must stay light); the estimate drives least_loaded routing and
    the conditional-disaggregation threshold only.
    """
    text = _text_of(body)
    if text is None:
        return 1
    if isinstance(text, list):
        return max(len(text), 1)
    return max(len(text) // 4, 1)


def prefix_key(body: dict[str, Any]) -> bytes:
    """The bytes prefix_aware routing hashes: the first ~512 characters (or 128 token ids)."""
    text = _text_of(body)
    if text is None:
        return b""
    if isinstance(text, list):
        return orjson.dumps(text[:128])
    return text[:_PREFIX_CHARS].encode("utf-8", "surrogatepass")
