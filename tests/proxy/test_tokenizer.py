"""The proxy's tokenization equals the model's: transformers here, vLLM's /tokenize (marker vllm)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from lmcache_disagg.errors import ConfigError
from lmcache_disagg.proxy.tokenizer import PromptTokenizer

PROMPTS = [
    "Hello world, the river ran quietly.",
    "  leading spaces and ünïcödé 😀 and\nnew lines\n\n",
    "Question: what is the capital of France? Answer:",
    "",
]
CHATS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "hi there"}],
    [
        {"role": "system", "content": "You are brief."},
        {"role": "user", "content": "Name a river."},
        {"role": "assistant", "content": "The Nile ünï."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "And"}, {"type": "text", "text": "another?"}],
        },
    ],
]


def _hf_chat(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            content = "\n".join(part["text"] for part in content)
        out.append({"role": m["role"], "content": content})
    return out


def test_matches_transformers(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    ours = PromptTokenizer.from_dir(tiny_model_dir)
    for prompt in PROMPTS:
        assert ours.request_tokens({"prompt": prompt}) == hf.encode(prompt)
        assert ours.request_tokens({"prompt": prompt, "add_special_tokens": False}) == hf.encode(
            prompt, add_special_tokens=False
        )
    for chat in CHATS:
        text = hf.apply_chat_template(_hf_chat(chat), tokenize=False, add_generation_prompt=True)
        assert ours.render_chat(chat) == text
        assert ours.request_tokens({"messages": chat}) == hf.encode(text, add_special_tokens=False)
        no_gen = hf.apply_chat_template(_hf_chat(chat), tokenize=False, add_generation_prompt=False)
        assert ours.render_chat(chat, add_generation_prompt=False) == no_gen


def test_repeated_prompts_hit_the_cache_and_it_is_bounded(tiny_model_dir: Path) -> None:
    ours = PromptTokenizer.from_dir(tiny_model_dir, cache_entries=2)
    first = ours.request_tokens({"prompt": PROMPTS[0]})
    assert ours.request_tokens({"prompt": PROMPTS[0]}) == first
    assert (ours.cache_hits, ours.cache_misses) == (1, 1)
    for prompt in PROMPTS[1:]:
        ours.request_tokens({"prompt": prompt})
    ours.request_tokens({"prompt": PROMPTS[0]})
    assert ours.cache_misses == 5, "the oldest entry was evicted (bound of 2)"


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": ["a", "b"]},  # batch prompt
        {"prompt": 5},
        {"prompt": "x", "add_special_tokens": "yes"},
        {"messages": []},
        {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
        {"messages": [{"role": "user", "content": "x"}], "chat_template": "{{ 1 }}"},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        {"messages": [{"role": "assistant", "content": None, "tool_calls": []}]},
        {"messages": ["not a dict"]},
    ],
)
def test_unpredictable_requests_give_none(tiny_model_dir: Path, body: dict[str, Any]) -> None:
    assert PromptTokenizer.from_dir(tiny_model_dir).request_tokens(body) is None


def test_token_id_prompt_is_used_as_is(tiny_model_dir: Path) -> None:
    ours = PromptTokenizer.from_dir(tiny_model_dir)
    assert ours.request_tokens({"prompt": [5, 6, 7]}) == [5, 6, 7]


def test_template_from_tokenizer_config_and_errors(tmp_path: Path, tiny_model_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"tokenizer\.json"):
        PromptTokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text((tiny_model_dir / "tokenizer.json").read_text())
    config = {"bos_token": {"content": "<s>"}, "chat_template": [
        {"name": "default", "template": "{{ bos_token }}{% for m in messages %}[{{ m.content }}]{% endfor %}"},
        {"name": "tool_use", "template": "unused"},
    ]}  # fmt: skip
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ours = PromptTokenizer.from_dir(tmp_path)
    assert ours.render_chat([{"role": "user", "content": "a"}]) == "<s>[a]"
    raising = "{{ raise_exception('no system role') }}"
    (tmp_path / "chat_template.jinja").write_text(raising)
    assert (
        PromptTokenizer.from_dir(tmp_path).render_chat([{"role": "user", "content": "a"}]) is None
    )


@pytest.mark.vllm
def test_matches_vllm_tokenize_endpoint(tiny_model_dir: Path, vllm_server_factory: Any) -> None:
    server = vllm_server_factory(tiny_model_dir, cpu_core=0)
    ours = PromptTokenizer.from_dir(tiny_model_dir)
    with httpx.Client(base_url=server.url, timeout=60) as client:
        model = client.get("/v1/models").json()["data"][0]["id"]
        for prompt in PROMPTS:
            got = client.post("/tokenize", json={"model": model, "prompt": prompt})
            got.raise_for_status()
            assert ours.request_tokens({"prompt": prompt}) == got.json()["tokens"], prompt
        for chat in CHATS:
            for gen in (True, False):
                got = client.post(
                    "/tokenize",
                    json={"model": model, "messages": chat, "add_generation_prompt": gen},
                )
                got.raise_for_status()
                body = {"messages": chat, "add_generation_prompt": gen}
                assert ours.request_tokens(body) == got.json()["tokens"], (chat, gen)


def test_growing_conversations_tokenize_incrementally_and_exactly(tiny_model_dir: Path) -> None:
    import random

    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    ours = PromptTokenizer.from_dir(tiny_model_dir)
    rng = random.Random(7)
    words = ["river", "cache", "ünï", "😀", "\n", "  ", "42", "x.y", "'s", "<s>", "\t"]

    def text(n: int) -> str:
        return "".join(rng.choice(words) + rng.choice([" ", "", "\n", "  "]) for _ in range(n))

    for _ in range(6):
        messages: list[dict[str, Any]] = [{"role": "system", "content": text(200)}]
        for _ in range(4):
            messages = [*messages, {"role": "user", "content": text(rng.randint(1, 60))}]
            rendered = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            expected = hf.encode(rendered, add_special_tokens=False)
            assert ours.request_tokens({"messages": messages}) == expected
            assert ours.request_tokens({"messages": messages}) == expected  # exact repeat
            messages = [*messages, {"role": "assistant", "content": text(rng.randint(1, 60))}]
    stats = ours.conversation_stats()
    assert stats["extended"] > 0 and stats["repeated"] == 24 and stats["full"] >= 6


def test_conversation_cache_is_bounded_by_tokens(tiny_model_dir: Path) -> None:
    from tokenizers import Tokenizer

    from lmcache_disagg.proxy.tokencache import ConversationCache

    cache = ConversationCache(
        Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json")), max_tokens=100
    )
    for i in range(50):
        cache.tokenize(f"conversation number {i} " * 3, [], bytes([i]) * 16)
    assert 0 < len(cache) < 50
    assert cache.tokenize("x" * 5000, [], b"big" * 5) and len(cache) < 50, "too big: not cached"
