"""Shared helpers of the real-vLLM end-to-end tests: request specs, clients, metrics, a proxy.

The specs are fixed (seeded token-id prompts of exact lengths, chat messages, n=2 seeded
sampling), so a monolithic vLLM run and a PD run can be compared request by request.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from lmcache_disagg.vllm_server import VLLMServer, free_port

# Prompt lengths the issue names (token counts); chunk_size is 256 in the tests.
LENGTHS = (1, 15, 16, 17, 255, 256, 257, 1000, 1500)
MAX_TOKENS = 12
VOCAB = 512
SPECIAL_IDS = 3  # 0 bos, 1 eos, 2 pad: never in random prompts
CHECKSUM_LINE = re.compile(
    r"kv-checksum side=(?P<side>[PD]) transfer=(?P<tid>\S+) chunk=(?P<chunk>\d+) "
    r"bytes=(?P<bytes>\d+) xxh3=(?P<xxh>[0-9a-f]+)"
)


def token_prompt(length: int, seed: int) -> list[int]:
    rng = random.Random(seed * 100003 + length)
    return [rng.randrange(SPECIAL_IDS, VOCAB) for _ in range(length)]


@dataclass(frozen=True)
class Spec:
    """One request: ``route`` is "completions" or "chat"; ``body`` lacks model/stream."""

    name: str
    route: str
    body: dict[str, Any]
    stream: bool = False
    prompt_tokens: int = 0


def chat_messages(words: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    vocab = [
        "river",
        "valley",
        "cache",
        "token",
        "prefill",
        "decode",
        "chunk",
        "layer",
        "quick",
        "brown",
        "fox",
        "jumps",
    ]
    text = " ".join(rng.choice(vocab) for _ in range(words))
    return [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": text},
    ]


def all_specs() -> list[Spec]:
    """>= 20 requests: every length streamed and not, chat both ways, n=2 seeded sampling."""
    specs: list[Spec] = []
    for length in LENGTHS:
        for stream in (False, True):
            prompt = token_prompt(length, seed=1 + int(stream))
            specs.append(
                Spec(
                    f"cmpl-{length}-{'stream' if stream else 'plain'}",
                    "completions",
                    {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0},
                    stream,
                    length,
                )
            )
    for words, stream in ((40, False), (300, True), (700, False), (120, True)):
        specs.append(
            Spec(
                f"chat-{words}-{'stream' if stream else 'plain'}",
                "chat",
                {
                    "messages": chat_messages(words, words),
                    "max_tokens": MAX_TOKENS,
                    "temperature": 0,
                },
                stream,
            )
        )
    for length, stream in ((600, False), (300, True)):
        specs.append(
            Spec(
                f"n2-{length}-{'stream' if stream else 'plain'}",
                "completions",
                {
                    "prompt": token_prompt(length, seed=7),
                    "max_tokens": MAX_TOKENS,
                    "n": 2,
                    "temperature": 1.0,
                    "seed": 1234,
                },
                stream,
                length,
            )
        )
    return specs


@dataclass
class Result:
    """What must be identical: per choice index, the generated token ids (or text) and finish."""

    choices: dict[int, tuple[Any, ...]] = field(default_factory=dict)
    usage: dict[str, Any] = field(default_factory=dict)

    def key(self) -> dict[int, tuple[Any, ...]]:
        return self.choices


def _choice_payload(choice: dict[str, Any], route: str) -> str:
    if route == "chat":
        if "delta" in choice:
            return str(choice["delta"].get("content") or "")
        return str((choice.get("message") or {}).get("content") or "")
    return str(choice.get("text") or "")


def run_spec(base_url: str, model: str, spec: Spec, timeout: float = 180.0) -> Result:
    """Send ``spec`` and collect its output (streamed or not) into a comparable Result."""
    path = "/v1/completions" if spec.route == "completions" else "/v1/chat/completions"
    body = {"model": model, **spec.body, "stream": spec.stream, "return_token_ids": True}
    if spec.stream:
        body["stream_options"] = {"include_usage": True}
    texts: dict[int, str] = {}
    tokens: dict[int, list[int]] = {}
    finish: dict[int, Any] = {}
    result = Result()
    if not spec.stream:
        response = httpx.post(base_url + path, json=body, timeout=timeout)
        response.raise_for_status()
        payload = response.json()
        for choice in payload["choices"]:
            index = choice["index"]
            texts[index] = _choice_payload(choice, spec.route)
            tokens[index] = list(choice.get("token_ids") or [])
            finish[index] = choice.get("finish_reason")
        result.usage = payload.get("usage") or {}
    else:
        with httpx.stream("POST", base_url + path, json=body, timeout=timeout) as response:
            response.raise_for_status()
            assert response.headers["content-type"].startswith("text/event-stream")
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[len("data: ") :])
                for choice in event.get("choices") or []:
                    index = choice["index"]
                    texts[index] = texts.get(index, "") + _choice_payload(choice, spec.route)
                    tokens.setdefault(index, []).extend(choice.get("token_ids") or [])
                    if choice.get("finish_reason"):
                        finish[index] = choice["finish_reason"]
                if event.get("usage"):
                    result.usage = event["usage"]
    for index in texts:
        result.choices[index] = (texts[index], tuple(tokens.get(index, ())), finish.get(index))
    return result


def run_all(base_url: str, model: str, specs: list[Spec]) -> dict[str, Result]:
    return {spec.name: run_spec(base_url, model, spec) for spec in specs}


# -- metrics --------------------------------------------------------------------------------------

_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][\w:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)$")


def scrape(server: VLLMServer) -> str:
    return httpx.get(server.url + "/metrics", timeout=10).text


def metric_sum(text: str, name: str, **labels: str) -> float:
    """Sum of all samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if not match or match.group("name") != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', match.group("labels") or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(match.group("value"))
    return total


def metric_labels(text: str, name: str, label: str) -> dict[str, float]:
    """``{label value: summed sample}`` for ``name`` (e.g. fallbacks by reason)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if not match or match.group("name") != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', match.group("labels") or ""))
        if label in got:
            out[got[label]] = out.get(got[label], 0.0) + float(match.group("value"))
    return out


def local_compute(server: VLLMServer) -> float:
    return metric_sum(scrape(server), "vllm:prompt_tokens_by_source_total", source="local_compute")


def wait_for(predicate: Any, timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def checksums(log_path: Path, side: str) -> dict[tuple[str, int], str]:
    out: dict[tuple[str, int], str] = {}
    for match in CHECKSUM_LINE.finditer(log_path.read_text(errors="replace")):
        if match.group("side") == side:
            out[(match.group("tid"), int(match.group("chunk")))] = match.group("xxh")
    return out


# -- servers and proxy ----------------------------------------------------------------------------


def connector_config(role: str, **extra: Any) -> dict[str, Any]:
    """``--kv-transfer-config`` for one of our workers (extra = lmcache-disagg config keys)."""
    return {
        "kv_connector": "LMCacheDisaggConnector",
        "kv_connector_module_path": "lmcache_disagg.connector",
        "kv_role": role,
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": extra,
    }


class Proxy:
    """``lmcache-disagg-proxy`` as a child process (never in the test process: no torch there)."""

    def __init__(self, prefill: str, decode: str, log_path: Path, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = log_path.open("wb")
        self._process = subprocess.Popen(
            [
                sys.executable, "-m", "lmcache_disagg.proxy.cli",
                "--host", "127.0.0.1", "--port", str(self.port),
                "--prefill", prefill, "--decode", decode, *extra,
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip

    def wait_ready(self, deadline_s: float = 60.0) -> Proxy:
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"proxy exited: {self.log_path.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"proxy not ready after {deadline_s}s")

    def stop(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=10)
        self._log.close()

    def __enter__(self) -> Proxy:
        return self.wait_ready()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class Pair:
    """One P and one D with our connector; ``kv`` is D's KV endpoint."""

    prefill: VLLMServer
    decode: VLLMServer
    kv: str

    def stop(self) -> None:
        self.prefill.stop()
        self.decode.stop()


VERIFY_ENV = {"LMCACHE_DISAGG_VERIFY_KV": "1"}
FAST_TIMEOUTS = {
    "connect_timeout": "2s",
    "handshake_timeout": "2s",
    "reserve_timeout": "2s",
    "push_deadline": "15s",
    "load_deadline": "20s",
    "reservation_ttl": "30s",
}

TRANSFER_ONLY = {"local_cpu": False}
"""The PD transfer tests resend their prompts on purpose (each must take the KV path again), so
their workers run without the chunk store (on by default), as they did before it existed; the
store's own tests (``test_cache.py``) cover PD with reuse."""


def start_servers(*servers: VLLMServer) -> None:
    """Start ``servers`` in order; if one fails, stop all of them (nothing left running)."""
    try:
        for server in servers:
            server.start()
    except BaseException:
        for server in servers:
            server.stop()
        raise


def start_pair(
    model_dir: Path,
    log_dir: Path,
    channel: str,
    *,
    p_extra: dict[str, Any] | None = None,
    d_extra: dict[str, Any] | None = None,
    p_args: tuple[str, ...] = (),
) -> Pair:
    """Start D (core 1) and P (core 0) one after the other; both pinned, both verifying KV."""
    from lmcache_disagg.vllm_server import VLLMServerSpec

    kv_port = free_port()
    d_config = {
        "channel": channel, "listen_port": kv_port, **FAST_TIMEOUTS, **TRANSFER_ONLY,
        **(d_extra or {}),
    }  # fmt: skip
    p_config = {
        "channel": channel, "listen_port": free_port(), **FAST_TIMEOUTS, **TRANSFER_ONLY,
        **(p_extra or {}),
    }  # fmt: skip
    decode = VLLMServer(
        VLLMServerSpec(
            model_dir=str(model_dir),
            cpu_core=1,
            kv_transfer_config=connector_config("kv_consumer", **d_config),
            env=VERIFY_ENV,
        ),
        log_dir / f"decode-{channel}.log",
    )
    prefill = VLLMServer(
        VLLMServerSpec(
            model_dir=str(model_dir),
            cpu_core=0,
            kv_transfer_config=connector_config("kv_producer", **p_config),
            env=VERIFY_ENV,
            extra_args=p_args,
        ),
        log_dir / f"prefill-{channel}.log",
    )
    start_servers(decode, prefill)
    return Pair(prefill, decode, f"127.0.0.1:{kv_port}")


def compare(expected: dict[str, Result], got: dict[str, Result]) -> list[str]:
    """Names of the specs whose outputs differ (with the first difference)."""
    bad = []
    for name, want in expected.items():
        have = got.get(name)
        if have is None or have.key() != want.key():
            bad.append(f"{name}: want {want.key()} got {None if have is None else have.key()}")
    return bad
