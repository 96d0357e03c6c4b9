"""The tiny model served by real vLLM (CPU) is deterministic: same greedy output twice, and the
same output from a second, independently started server."""

from __future__ import annotations

import httpx
import pytest

from lmcache_disagg.vllm_server import VLLMServer

pytestmark = pytest.mark.vllm

PROMPTS = [
    "The quick brown fox",
    "In the beginning the river ran quietly through the valley, past farms and mills",
    "x",
]


def _greedy(server: VLLMServer, model: str, prompt: str) -> list[str]:
    body = {"model": model, "prompt": prompt, "max_tokens": 24, "temperature": 0, "logprobs": 1}
    response = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    response.raise_for_status()
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] in ("length", "stop")
    tokens: list[str] = choice["logprobs"]["tokens"]
    return tokens


def test_tiny_model_greedy_is_deterministic_across_servers(
    tiny_model_dir, module_vllm_server_factory
) -> None:
    model = str(tiny_model_dir)
    first = module_vllm_server_factory(tiny_model_dir, cpu_core=0)
    runs = [[_greedy(first, model, p) for p in PROMPTS] for _ in range(2)]
    assert runs[0] == runs[1]
    assert all(len(tokens) >= 1 for tokens in runs[0])
    first.stop()  # keep to one server at a time on this 2-core box

    second = module_vllm_server_factory(tiny_model_dir, cpu_core=1)
    assert [_greedy(second, model, p) for p in PROMPTS] == runs[0]


def test_chat_template_serves_chat_completions(tiny_model_dir, module_vllm_server_factory) -> None:
    server = module_vllm_server_factory(tiny_model_dir, cpu_core=0)
    body = {
        "model": str(tiny_model_dir),
        "messages": [{"role": "user", "content": "Hello, how are you?"}],
        "max_tokens": 8,
        "temperature": 0,
    }
    response = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    payload = response.json()
    assert payload["choices"][0]["message"]["role"] == "assistant"
    assert payload["usage"]["completion_tokens"] == 8
    assert payload["usage"]["prompt_tokens"] > 5
