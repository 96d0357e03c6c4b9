"""One streamed greedy completion against an OpenAI server, timed: the benches' common probe."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import httpx

__all__ = ["StreamedCompletion", "stream_completion"]


@dataclass(frozen=True)
class StreamedCompletion:
    """Time to the first generated token, time to the end, and the generated token ids."""

    ttft_s: float
    total_s: float
    token_ids: list[int]


def stream_completion(
    url: str, model: str, prompt: list[int], max_tokens: int, timeout_s: float = 900.0
) -> StreamedCompletion:
    """POST ``/v1/completions`` with ``stream`` and ``return_token_ids``; raise on a non-2xx."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "return_token_ids": True,
    }
    start = time.perf_counter()
    ttft = 0.0
    tokens: list[int] = []
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=timeout_s) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            for choice in event.get("choices") or []:
                ids = choice.get("token_ids") or []
                if (ids or choice.get("text")) and not ttft:
                    ttft = time.perf_counter() - start
                tokens.extend(ids)
    return StreamedCompletion(ttft, time.perf_counter() - start, tokens)
