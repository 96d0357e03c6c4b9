"""A fast stub vLLM worker that speaks the PD protocol, with injectable faults.

Run as ``python -m lmcache_disagg.bench.stub_worker --port N --role prefill|decode [--fault F]``.
The proxy's tests and ``lmcache-disagg bench proxy`` start these as real processes.

* ``prefill`` answers ``/v1/completions`` and ``/v1/chat/completions`` with one token and returns
  ``kv_transfer_params`` in the shape P's connector returns (stock NixlConnector fields plus
  ``lmcache_transfer_id`` / ``lmcache_push_target`` echoed and ``lmcache_num_tokens``).
* ``decode`` answers with ``max_tokens`` tokens per choice (``n`` honoured), streaming or not,
  with ``usage`` (and the usage chunk when ``stream_options.include_usage``). With
  ``--report-cached`` it fills ``prompt_tokens_details.cached_tokens`` itself.

Faults (``--fault`` at start, or ``POST /stub/fault {"fault": F, "rate": R}`` at run time; that
call also takes ``slow_delay``, ``report_cached`` and ``model``):
``500``, ``400``, ``hang``, ``reset`` (TCP RST before answering), ``slow`` (``--slow-delay`` per
token), ``die`` (die mid-stream / mid-body), ``unhealthy`` (``/health`` answers 503).

With ``--kv-events tcp://HOST:PORT --tokenizer DIR`` it keeps a chunk-key cache and publishes
real KV events (:mod:`.stub_cache`); ``cached_tokens`` is then its own hit plus what P pushed, and
``POST /stub/fault {"forget_cache": true}`` empties the cache without telling the proxy, and
``POST /stub/peek`` with a request body answers ``{"cached_tokens", "prompt_tokens"}`` without
storing anything (the routing bench's oracle reads every cache exactly this way).

A cost model (``--prefill-fixed-ms``, ``--prefill-us-per-token``, ``--decode-ms-per-token``; all
0 by default) makes the stub take time like an engine: prefills run one at a time on one lane,
each taking the fixed cost plus the per-token cost of every prompt token it did not have cached,
and decoding (concurrent, as in a batch) takes the per-token cost for every answer token.

Introspection for tests: ``GET /stub/log`` returns the recent requests (bounded) and events such as
``cancelled`` (the client - i.e. the proxy - closed the connection while the request was running).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from lmcache_disagg import kv_params
from lmcache_disagg.bench.stub_http import (
    Request,
    Responder,
    ServerLimits,
    make_listen_socket,
    serve,
)

if TYPE_CHECKING:
    from lmcache_disagg.bench.stub_cache import StubCache

__all__ = ["FAULTS", "CostModel", "StubWorker", "main"]

FAULTS = ("none", "500", "400", "hang", "reset", "slow", "die", "unhealthy")
_LOG_LIMIT = 512
_HANG_SECONDS = 3600.0


def _prompt_tokens(body: dict[str, Any]) -> int:
    """A deterministic stand-in for tokenization: whitespace words (token ids count as given)."""
    if "messages" in body:
        total = 0
        for message in body.get("messages") or []:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, str):
                total += len(content.split()) + 1
        return max(total, 1)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return max(len(prompt.split()), 1)
    if isinstance(prompt, list) and prompt:
        if isinstance(prompt[0], int):
            return len(prompt)
        first = prompt[0]
        if isinstance(first, str):
            return max(len(first.split()), 1)
        if isinstance(first, list):
            return max(len(first), 1)
    return 1


@dataclass(frozen=True)
class CostModel:
    """How long a stub takes, like an engine (all zero: answer at once)."""

    prefill_fixed_ms: float = 0.0
    prefill_us_per_token: float = 0.0
    """Per prompt token the stub did not have cached."""
    decode_ms_per_token: float = 0.0

    def validate(self) -> None:
        costs = (self.prefill_fixed_ms, self.prefill_us_per_token, self.decode_ms_per_token)
        if any(not 0 <= c < 1e6 for c in costs):
            raise ValueError("cost model values must be >= 0")

    def prefill_s(self, uncached_tokens: int) -> float:
        return (self.prefill_fixed_ms + self.prefill_us_per_token * uncached_tokens / 1e3) / 1e3


class StubWorker:
    """State of one stub worker process. All methods run in the event loop."""

    def __init__(
        self,
        role: str,
        port: int,
        model: str,
        fault: str = "none",
        fault_rate: float = 1.0,
        slow_delay: float = 0.05,
        report_cached: bool = False,
        seed: int = 0,
        cache: StubCache | None = None,
        cost: CostModel | None = None,
    ) -> None:
        self.cache = cache
        self.cost = cost or CostModel()
        self.cost.validate()
        self.prefill_lane = asyncio.Lock()
        self.role = role
        self.port = port
        self.model = model
        self.fault = fault
        self.fault_rate = fault_rate
        self.slow_delay = slow_delay
        self.report_cached = report_cached
        self.rng = random.Random(seed)
        self.log: deque[dict[str, Any]] = deque(maxlen=_LOG_LIMIT)
        self.events: deque[dict[str, Any]] = deque(maxlen=_LOG_LIMIT)
        self.counts: dict[str, int] = {"requests": 0, "cancelled": 0, "faults": 0}
        self.inflight = 0
        self.fingerprint = f"stub-{role}-{port}"

    def _fault_now(self) -> str:
        if self.fault in ("none", "unhealthy"):
            return "none"
        if self.fault_rate >= 1.0 or self.rng.random() < self.fault_rate:
            self.counts["faults"] += 1
            return self.fault
        return "none"

    async def handle(self, req: Request, resp: Responder) -> None:
        path = req.path
        if req.method == b"GET":
            if path == "/health":
                if self.fault == "unhealthy":
                    resp.send(503, b'{"status":"unhealthy"}')
                else:
                    resp.send(200, b"{}")
            elif path == "/v1/models":
                resp.send(
                    200,
                    orjson.dumps(
                        {
                            "object": "list",
                            "data": [{"id": self.model, "object": "model", "owned_by": "stub"}],
                        }
                    ),
                )
            elif path == "/stub/log":
                resp.send(
                    200,
                    orjson.dumps(
                        {
                            "requests": list(self.log),
                            "events": list(self.events),
                            "counts": self.counts,
                            "inflight": self.inflight,
                        }
                    ),
                )
            else:
                resp.send(404, b'{"error":{"message":"not found"}}')
            return
        if path == "/stub/fault":
            spec = orjson.loads(req.body)
            self.fault = str(spec.get("fault", "none"))
            self.fault_rate = float(spec.get("rate", 1.0))
            if "slow_delay" in spec:
                self.slow_delay = float(spec["slow_delay"])
            if "forget_cache" in spec and self.cache is not None:
                self.cache.forget()
            if "report_cached" in spec:
                self.report_cached = bool(spec["report_cached"])
            if "model" in spec:
                self.model = str(spec["model"])
            resp.send(200, b"{}")
            return
        if path == "/stub/peek":
            hit = self.cache.peek(orjson.loads(req.body)) if self.cache is not None else None
            if hit is None:
                resp.send(404, b'{"error":{"message":"no cache, or the body is not tokenizable"}}')
            else:
                resp.send(
                    200,
                    orjson.dumps(
                        {"cached_tokens": hit.cached_tokens, "prompt_tokens": hit.prompt_tokens}
                    ),
                )
            return
        if path == "/stub/clear":
            self.log.clear()
            self.events.clear()
            self.counts = {"requests": 0, "cancelled": 0, "faults": 0}
            resp.send(200, b"{}")
            return
        if path not in ("/v1/completions", "/v1/chat/completions"):
            resp.send(404, b'{"error":{"message":"not found"}}')
            return
        self.counts["requests"] += 1
        self.inflight += 1
        rid = req.headers.get(b"x-request-id", b"").decode("latin-1")
        try:
            await self._generate(req, resp, path == "/v1/chat/completions", rid)
        except asyncio.CancelledError:
            self.counts["cancelled"] += 1
            self.events.append({"event": "cancelled", "request_id": rid, "time": time.time()})
            raise
        finally:
            self.inflight -= 1

    async def _generate(self, req: Request, resp: Responder, chat: bool, rid: str) -> None:
        body = orjson.loads(req.body)
        auth = req.headers.get(b"authorization")
        self.log.append(
            {
                "request_id": rid,
                "path": req.path,
                "body": body,
                "authorization": auth.decode("latin-1") if auth else None,
                "time": time.time(),
            }
        )
        fault = self._fault_now()
        if fault == "500":
            resp.send(500, b'{"error":{"message":"injected failure","type":"internal","code":500}}')
            return
        if fault == "400":
            resp.send(
                400,
                b'{"error":{"message":"injected bad request","type":"BadRequestError","code":400}}',
            )
            return
        if fault == "hang":
            await asyncio.sleep(_HANG_SECONDS)
            return
        if fault == "reset":
            resp.abort(reset=True)
            return
        hit = self.cache.serve(body) if self.cache is not None else None
        n_prompt = hit.prompt_tokens if hit is not None else _prompt_tokens(body)
        cached_here = hit.cached_tokens if hit is not None else None
        if self.cost.prefill_fixed_ms or self.cost.prefill_us_per_token:
            async with self.prefill_lane:
                await asyncio.sleep(self.cost.prefill_s(n_prompt - (cached_here or 0)))
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        cid = ("chatcmpl-" if chat else "cmpl-") + (rid or "x")
        if self.role == "prefill":
            params = body.get(kv_params.KV_TRANSFER_PARAMS) or {}
            out_params = {
                kv_params.DO_REMOTE_PREFILL: True,
                kv_params.DO_REMOTE_DECODE: False,
                "remote_engine_id": self.fingerprint,
                "remote_block_ids": [0, 1],
                "remote_host": "127.0.0.1",
                "remote_port": self.port,
                kv_params.TRANSFER_ID: params.get(kv_params.TRANSFER_ID),
                kv_params.PUSH_TARGET: params.get(kv_params.PUSH_TARGET),
                kv_params.NUM_TOKENS: n_prompt,
            }
            choice: dict[str, Any] = {"index": 0, "finish_reason": "length", "logprobs": None}
            if chat:
                choice["message"] = {"role": "assistant", "content": "p"}
            else:
                choice["text"] = "p"
            resp.send(
                200,
                orjson.dumps(
                    {
                        "id": cid,
                        "object": obj,
                        "created": created,
                        "model": self.model,
                        "choices": [choice],
                        "usage": {
                            "prompt_tokens": n_prompt,
                            "completion_tokens": 1,
                            "total_tokens": n_prompt + 1,
                        },
                        "kv_transfer_params": out_params,
                        "system_fingerprint": self.fingerprint,
                    }
                ),
            )
            return
        # decode
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or 16
        n = int(body.get("n") or 1)
        in_params = body.get(kv_params.KV_TRANSFER_PARAMS)
        usage: dict[str, Any] = {
            "prompt_tokens": n_prompt,
            "completion_tokens": max_tokens * n,
            "total_tokens": n_prompt + max_tokens * n,
            "prompt_tokens_details": None,
        }
        if self.report_cached:
            cached = in_params.get(kv_params.NUM_TOKENS, 0) if isinstance(in_params, dict) else 0
            usage["prompt_tokens_details"] = {"cached_tokens": cached}
        elif cached_here is not None:
            pushed = in_params.get(kv_params.NUM_TOKENS, 0) if isinstance(in_params, dict) else 0
            usage["prompt_tokens_details"] = {"cached_tokens": cached_here + pushed}
        if body.get("stream"):
            await self._stream(resp, chat, cid, obj, created, n, max_tokens, usage, body, fault)
            return
        choices = []
        for i in range(n):
            text = "".join(f" tok{t}" for t in range(max_tokens))
            c: dict[str, Any] = {"index": i, "finish_reason": "length", "logprobs": None}
            if chat:
                c["message"] = {"role": "assistant", "content": text}
            else:
                c["text"] = text
            choices.append(c)
        payload = orjson.dumps(
            {
                "id": cid,
                "object": obj,
                "created": created,
                "model": self.model,
                "choices": choices,
                "usage": usage,
                "system_fingerprint": self.fingerprint,
            }
        )
        if fault == "slow":
            await asyncio.sleep(self.slow_delay * max_tokens)
        if self.cost.decode_ms_per_token:
            await asyncio.sleep(self.cost.decode_ms_per_token * max_tokens / 1e3)
        if fault == "die":
            resp.start_stream(200, content_type=b"application/json", first_chunk=payload[:20])
            await asyncio.sleep(0.01)
            resp.abort(reset=True)
            return
        resp.send(200, payload)

    async def _stream(
        self,
        resp: Responder,
        chat: bool,
        cid: str,
        obj: str,
        created: int,
        n: int,
        max_tokens: int,
        usage: dict[str, Any],
        body: dict[str, Any],
        fault: str,
    ) -> None:
        chunk_obj = "chat.completion.chunk" if chat else "text_completion"
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        head = {"id": cid, "object": chunk_obj, "created": created, "model": self.model}

        def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            return b"data: " + orjson.dumps({**head, "choices": choices, **extra}) + b"\n\n"

        resp.start_stream(200)
        if chat:
            await resp.write(
                event(
                    [
                        {
                            "index": i,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                        }
                        for i in range(n)
                    ]
                )
            )
        for t in range(max_tokens):
            if fault == "die" and t == max_tokens // 2:
                await asyncio.sleep(0.01)
                resp.abort(reset=True)
                return
            if fault == "slow":
                await asyncio.sleep(self.slow_delay)
            if self.cost.decode_ms_per_token and t:
                await asyncio.sleep(self.cost.decode_ms_per_token / 1e3)
            last = t == max_tokens - 1
            for i in range(n):
                choice: dict[str, Any] = {
                    "index": i,
                    "finish_reason": "length" if last else None,
                    "logprobs": None,
                }
                if chat:
                    choice["delta"] = {"content": f" tok{t}"}
                else:
                    choice["text"] = f" tok{t}"
                await resp.write(event([choice]))
        if include_usage:
            await resp.write(event([], usage=usage))
        resp.end_stream(b"data: [DONE]\n\n")


async def _amain(args: argparse.Namespace) -> None:
    cache = None
    if args.kv_events:
        from lmcache_disagg.bench.stub_cache import StubCache

        if not args.tokenizer:
            raise SystemExit("--kv-events needs --tokenizer DIR")
        cache = StubCache(args.kv_events, args.tokenizer, args.cache_chunks, f"stub-{args.port}")
        cache.start()
    worker = StubWorker(
        role=args.role,
        port=args.port,
        model=args.model,
        fault=args.fault,
        fault_rate=args.fault_rate,
        slow_delay=args.slow_delay,
        report_cached=args.report_cached,
        seed=args.seed,
        cache=cache,
        cost=CostModel(args.prefill_fixed_ms, args.prefill_us_per_token, args.decode_ms_per_token),
    )
    sock = make_listen_socket(args.host, args.port)
    server = await serve(worker.handle, sock, ServerLimits(keep_alive_timeout=300.0))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"stub {args.role} listening on {args.host}:{args.port}", flush=True)
    await stop.wait()
    server.close()
    if cache is not None:
        cache.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="stub vLLM worker speaking the PD protocol")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--role", choices=("prefill", "decode"), required=True)
    parser.add_argument("--model", default="stub-model")
    parser.add_argument("--fault", choices=FAULTS, default="none")
    parser.add_argument("--fault-rate", type=float, default=1.0)
    parser.add_argument("--slow-delay", type=float, default=0.05)
    parser.add_argument("--report-cached", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--kv-events",
        metavar="tcp://HOST:PORT",
        help="keep a chunk cache and publish its KV events here",
    )
    parser.add_argument("--tokenizer", metavar="DIR", help="with --kv-events: the tokenizer")
    parser.add_argument("--cache-chunks", type=int, default=4096)
    parser.add_argument("--prefill-fixed-ms", type=float, default=0.0)
    parser.add_argument(
        "--prefill-us-per-token", type=float, default=0.0, help="per uncached prompt token"
    )
    parser.add_argument("--decode-ms-per-token", type=float, default=0.0)
    args = parser.parse_args(argv)  # fmt: skip
    try:
        import uvloop

        uvloop.run(_amain(args))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
