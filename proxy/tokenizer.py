"""The proxy's own tokenization of a request, as vLLM does it (torch-free: ``tokenizers`` + jinja2).

The cache-aware policy needs the prompt's token ids to compute its chunk keys. They must be the
ids the worker will see, or no key matches:

* **completions:** ``prompt`` (a string) is encoded with ``add_special_tokens`` (default True,
  like vLLM), through the model's ``tokenizer.json`` (its post-processor adds BOS where the model
  wants it; ``add_bos_token`` in ``tokenizer_config.json`` is honoured too). A token-id prompt is
  used as is.
* **chat:** the messages are rendered with the model's chat template the way transformers renders
  it for vLLM (a sandboxed jinja2 environment with ``trim_blocks``/``lstrip_blocks``, the
  ``loopcontrols`` extension, the ``tojson`` filter, ``raise_exception`` and ``strftime_now``, the
  special tokens as variables), text parts of a message joined with newlines (vLLM's "string"
  content format), and then encoded with ``add_special_tokens`` False (vLLM's chat default).

What cannot be predicted exactly returns None (the policy then routes by load only): tools,
non-text content parts, a request-supplied chat template, batch prompts, unknown template
variables. The tokenization of a repeated rendered prompt is cached (LRU, bounded), and a chat
that extends an earlier request's conversation is tokenized incrementally (:mod:`.tokencache`).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import orjson
import xxhash
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from lmcache_disagg.errors import ConfigError
from lmcache_disagg.proxy.tokencache import ConversationCache

__all__ = ["PromptTokenizer"]

_MAX_CACHED_CHARS = 1 << 20
"""Prompts longer than this are tokenized every time rather than cached."""


class _Generation(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (assistant-mask markers): renders the body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return str(caller())


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _token_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


class PromptTokenizer:
    """Tokenizes completions and chat requests like the model's vLLM server. Thread-safe."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        chat_template: str | None,
        special_tokens: Mapping[str, str],
        *,
        add_bos: int | None = None,
        cache_entries: int = 4096,
    ) -> None:
        self._tokenizer = tokenizer
        self._special = dict(special_tokens)
        self._add_bos = add_bos
        self._template: jinja2.Template | None = None
        if chat_template is not None:
            env = ImmutableSandboxedEnvironment(
                trim_blocks=True,
                lstrip_blocks=True,
                extensions=[_Generation, jinja2.ext.loopcontrols],
                undefined=jinja2.Undefined,
            )
            env.filters["tojson"] = _tojson
            env.globals["raise_exception"] = _raise_exception
            env.globals["strftime_now"] = _strftime_now
            self._template = env.from_string(chat_template)
        self._conversations = ConversationCache(tokenizer)
        self._cache: OrderedDict[tuple[str, bool], list[int]] = OrderedDict()
        self._cache_entries = cache_entries
        self._lock = threading.Lock()
        self.cache_hits = 0
        self.cache_misses = 0

    @classmethod
    def from_dir(cls, path: str | Path, cache_entries: int = 4096) -> PromptTokenizer:
        """Load ``tokenizer.json`` and the chat template from a local model directory."""
        root = Path(path)
        tokenizer_file = root / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ConfigError(
                f"{root} has no tokenizer.json: point --tokenizer at a local model directory "
                "(a fast tokenizer is required)"
            )
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
        config: dict[str, Any] = {}
        config_file = root / "tokenizer_config.json"
        if config_file.is_file():
            config = json.loads(config_file.read_text())
        special: dict[str, str] = {}
        for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
            text = _token_text(config.get(name))
            if text is not None:
                special[name] = text
        template = _chat_template(root, config)
        add_bos: int | None = None
        bos = special.get("bos_token")
        if config.get("add_bos_token") is True and bos is not None:
            bos_id = tokenizer.token_to_id(bos)
            probe = tokenizer.encode("a", add_special_tokens=True).ids
            if bos_id is not None and probe[:1] != [bos_id]:
                add_bos = bos_id
        return cls(tokenizer, template, special, add_bos=add_bos, cache_entries=cache_entries)

    # -- public --------------------------------------------------------------------------------
    def conversation_stats(self) -> dict[str, int]:
        """How chat prompts were tokenized: exact repeats, extensions of a cached prefix, whole."""
        c = self._conversations
        return {"repeated": c.repeated, "extended": c.extended, "full": c.full}

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        key = (text, add_special_tokens)
        with self._lock:
            ids = self._cache.get(key)
            if ids is not None:
                self._cache.move_to_end(key)
                self.cache_hits += 1
                return ids
            self.cache_misses += 1
        ids = self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self._add_bos is not None:
            ids = [self._add_bos, *ids]
        if len(text) <= _MAX_CACHED_CHARS:
            with self._lock:
                self._cache[key] = ids
                while len(self._cache) > self._cache_entries:
                    self._cache.popitem(last=False)
        return ids

    def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> str | None:
        """The prompt text vLLM renders for ``messages`` (None: not predictable here)."""
        if self._template is None:
            return None
        conversation = []
        for message in messages:
            converted = _string_message(message)
            if converted is None:
                return None
            conversation.append(converted)
        variables: dict[str, Any] = dict(self._special)
        variables.update(template_kwargs or {})
        try:
            text = self._template.render(
                messages=conversation,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except jinja2.exceptions.TemplateError:
            return None
        if continue_final_message and conversation:
            final = conversation[-1]["content"]
            if not isinstance(final, str) or final.strip() not in text:
                return None
            # transformers cuts the text right after the final message's content.
            end = text.rindex(final.strip()) + len(final.strip())
            text = text[:end]
        return text

    def request_tokens(self, body: Mapping[str, Any]) -> list[int] | None:
        """The prompt token ids vLLM will see for an OpenAI request body, or None."""
        if "messages" in body:
            return self._chat_tokens(body)
        prompt = body.get("prompt")
        add_special = body.get("add_special_tokens", True)
        if not isinstance(add_special, bool):
            return None
        if isinstance(prompt, str):
            return self.encode(prompt, add_special)
        if (
            isinstance(prompt, list)
            and prompt
            and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
        ):
            return list(prompt)
        return None

    # -- internals -----------------------------------------------------------------------------
    def _chat_tokens(self, body: Mapping[str, Any]) -> list[int] | None:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return None
        if body.get("tools") or body.get("chat_template") or body.get("documents"):
            return None
        add_generation_prompt = body.get("add_generation_prompt", True)
        continue_final = body.get("continue_final_message", False)
        add_special = body.get("add_special_tokens", False)
        kwargs = body.get("chat_template_kwargs") or {}
        if not (
            isinstance(add_generation_prompt, bool)
            and isinstance(continue_final, bool)
            and isinstance(add_special, bool)
            and isinstance(kwargs, dict)
        ):
            return None
        text = self.render_chat(messages, add_generation_prompt, continue_final, kwargs)
        if text is None:
            return None
        if add_special or self._add_bos is not None or len(messages) < 2:
            return self.encode(text, add_special)
        try:
            digests = _prefix_digests(messages, [add_generation_prompt, continue_final, kwargs])
        except TypeError:  # not JSON-serializable template kwargs
            return self.encode(text, add_special)
        # The previous round is usually this conversation minus the last answer and question.
        return self._conversations.tokenize(text, digests[-2::-1][:2], digests[-1])


def _string_message(message: Any) -> dict[str, Any] | None:
    if not isinstance(message, Mapping):
        return None
    role = message.get("role")
    content = message.get("content")
    if not isinstance(role, str) or set(message) - {"role", "content", "name"}:
        return None
    if content is None:
        text = ""
    elif isinstance(content, str):
        text = content
    elif isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, Mapping) and part.get("type") == "text"):
                return None
            value = part.get("text")
            if not isinstance(value, str):
                return None
            parts.append(value)
        text = "\n".join(parts)
    else:
        return None
    out: dict[str, Any] = {"role": role, "content": text}
    if isinstance(message.get("name"), str):
        out["name"] = message["name"]
    return out


def _chat_template(root: Path, config: Mapping[str, Any]) -> str | None:
    jinja_file = root / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text()
    json_file = root / "chat_template.json"
    if json_file.is_file():
        data = json.loads(json_file.read_text())
        if isinstance(data, dict) and isinstance(data.get("chat_template"), str):
            return str(data["chat_template"])
    template = config.get("chat_template")
    if isinstance(template, str):
        return template
    if isinstance(template, list):
        for entry in template:
            if isinstance(entry, dict) and entry.get("name") == "default":
                value = entry.get("template")
                return value if isinstance(value, str) else None
    return None


def _prefix_digests(messages: Sequence[Any], flags: list[Any]) -> list[bytes]:
    """Digests of ``messages[:1]``, ``messages[:2]``, ... (with the rendering flags)."""
    state = xxhash.xxh3_128(orjson.dumps(flags, option=orjson.OPT_SORT_KEYS))
    out = []
    for message in messages:
        state.update(orjson.dumps(message, option=orjson.OPT_SORT_KEYS))
        out.append(state.digest())
    return out
