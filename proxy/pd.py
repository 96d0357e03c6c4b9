"""The PD request flow for ``/v1/completions`` and ``/v1/chat/completions`` (DESIGN "Request flow").

One :class:`PDFlow` per proxy process; :meth:`PDFlow.run` is called once per validated request from
the server's handler task. Cancelling that task (client disconnect) cancels whichever upstream call
is in flight, which closes its connection, so P and D see the abort at once.

Order of events for one request:

1. pick D, then P (routing policy);
2. prefill on P with ``max_tokens=1``, ``stream=false`` and our ``kv_transfer_params`` (stock
   NixlConnector fields + transfer id + D's KV endpoint as push target); on failure before P
   answers, retry on another P, and when none is usable let D prefill locally;
3. decode on D with the original request plus P's returned params verbatim; a D failure before its
   first byte is retried once on another D (which prefills locally, or gets a fresh push);
4. stream D's answer back (usage fixed); a failure after the first byte becomes an SSE error event.

Under ``cache_aware`` routing, D's reported ``cached_tokens`` (minus what P pushed) is the actual
hit that the prediction is compared with: read from D's JSON answer, or from the usage event of its
stream. A streamed request whose client did not ask for that event gets
``stream_options.include_usage`` added on its way to D, and the relay drops the event again, so the
client receives the stream it asked for.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from lmcache_disagg import kv_params
from lmcache_disagg.proxy.errors import (
    NoWorkerAvailable,
    ProxyError,
    UpstreamError,
    UpstreamStatusError,
    UpstreamTimeout,
)
from lmcache_disagg.proxy.kvrouting import KVRouting, reported_cached_tokens
from lmcache_disagg.proxy.metrics import ProxyMetrics
from lmcache_disagg.proxy.routing import Router
from lmcache_disagg.proxy.settings import ProxySettings
from lmcache_disagg.proxy.upstream import UpstreamClient, UpstreamStream
from lmcache_disagg.proxy.usage import SSEUsagePatcher, patch_json_body
from lmcache_disagg.proxy.validation import is_batch_prompt
from lmcache_disagg.proxy.workers import Worker

__all__ = ["PDFlow", "Reply", "RequestContext", "error_body"]

# P samples one token that is thrown away, so nothing about sampling matters on P. ``seed`` is
# dropped too: vLLM 0.32's CPU engine crashes on seeded sampling with chunked prefill.
_PREFILL_DROP = ("stream_options", "min_tokens", "seed")


def error_body(
    message: str,
    error_type: str,
    code: int,
    param: str | None = None,
    request_id: str | None = None,
) -> bytes:
    """An OpenAI-style error object (plus the request id, so a client can quote it)."""
    error: dict[str, Any] = {"message": message, "type": error_type, "param": param, "code": code}
    if request_id is not None:
        error["request_id"] = request_id
    return orjson.dumps({"error": error})


JSON = b"application/json"
EVENT_STREAM = b"text/event-stream"


@dataclass(slots=True)
class Reply:
    """What the flow answers: a status, headers and either a whole body or a stream of chunks.

    The server adapter sends it. When ``stream`` is set it must be iterated to its end or closed
    with ``aclose()`` (that releases the upstream connection); ``body`` is then unused.
    """

    status: int
    body: bytes = b""
    headers: tuple[tuple[bytes, bytes], ...] = ()
    content_type: bytes = JSON
    stream: AsyncGenerator[bytes, None] | None = None
    release: Callable[[], None] | None = None


@dataclass(slots=True)
class RequestContext:
    """Per-request state, also the source of the request's log line."""

    request_id: str
    path: str
    body: dict[str, Any]
    stream: bool
    est_tokens: int
    prefix: bytes
    started: float = field(default_factory=time.perf_counter)
    prefill_worker: str | None = None
    decode_worker: str | None = None
    prefill_ms: float | None = None
    ttft_ms: float | None = None
    prefill_attempts: int = 0
    transfers: int = 0
    """PD attempts so far; numbers transfer ids so each attempt (and re-push) has its own."""
    decode_attempts: int = 0
    fallback: str | None = None
    pushed_tokens: int | None = None
    prefill_prompt_tokens: int | None = None
    token_ids: list[int] | None = None
    """cache_aware: the prompt as the workers will tokenize it (None: not predictable)."""
    predicted_hit_tokens: int | None = None
    """cache_aware: the chosen D's cached prefix according to the index."""
    usage_injected: bool = False
    """cache_aware, streamed: the proxy added ``include_usage`` for D; the relay drops the event."""
    status: int = 0
    error: str | None = None


class PDFlow:
    """Runs the PD flow; shared by all requests of one process (event loop thread only)."""

    def __init__(
        self,
        settings: ProxySettings,
        router: Router,
        client: UpstreamClient,
        metrics: ProxyMetrics,
        kv: KVRouting | None = None,
    ) -> None:
        self._kv = kv
        self._s = settings
        self._router = router
        self._client = client
        self._m = metrics
        # Workers are few and long-lived; a removed worker's gauge entry stays (bounded by adds).
        self._inflight_gauges: dict[Worker, Any] = {}

    @staticmethod
    def _headers(ctx: RequestContext) -> dict[str, str]:
        # content-type and the worker key are the session's default headers (upstream.py).
        return {"x-request-id": ctx.request_id}

    # -- bookkeeping ------------------------------------------------------------------------
    def _gauge(self, worker: Worker) -> Any:
        gauge = self._inflight_gauges.get(worker)
        if gauge is None:
            gauge = self._inflight_gauges[worker] = self._m.inflight.labels(
                worker.role, worker.http
            )
        return gauge

    def _enter(self, worker: Worker, tokens: int) -> None:
        worker.inflight += 1
        worker.outstanding_tokens += tokens
        self._gauge(worker).set(worker.inflight)

    def _leave(self, worker: Worker, tokens: int) -> None:
        worker.inflight -= 1
        worker.outstanding_tokens -= tokens
        self._gauge(worker).set(worker.inflight)

    def _failure(self, worker: Worker) -> None:
        worker.breaker.record_failure()
        self._m.breaker_state.labels(worker.role, worker.http).set(worker.breaker.state)

    def _success(self, worker: Worker) -> None:
        if worker.breaker.state:
            worker.breaker.record_success()
            self._m.breaker_state.labels(worker.role, worker.http).set(worker.breaker.state)
        else:
            worker.breaker.record_success()

    # -- the flow ---------------------------------------------------------------------------
    async def run(self, ctx: RequestContext) -> Reply:
        """Serve one request. Raises ProxyError when it fails before any answer exists."""
        decode, choice = self._router.pick_cached("decode", ctx.prefix, (), ctx.token_ids)
        if decode is None:
            raise NoWorkerAvailable("no healthy decode worker")
        params: dict[str, Any] | None = None
        threshold = self._s.local_prefill_threshold
        reason = None
        if choice is not None and self._kv is not None and ctx.token_ids:
            ctx.predicted_hit_tokens = choice.cached_tokens
            self._m.predicted_hit_tokens.observe(choice.cached_tokens)
            reason = self._kv.policy.prefill_decision(ctx.token_ids, choice)
            self._m.cache_aware_decisions.labels(reason).inc()
        if reason == "cached_on_decode":
            ctx.fallback = "cached_on_decode"
            self._m.fallbacks.labels("cached_on_decode").inc()
        elif threshold and ctx.est_tokens < threshold:
            ctx.fallback = "short_prompt"
            self._m.fallbacks.labels("short_prompt").inc()
        elif is_batch_prompt(ctx.body):
            ctx.fallback = "batch_prompt"
            self._m.fallbacks.labels("batch_prompt").inc()
        else:
            params = await self._prefill(ctx, decode)
        return await self._decode(ctx, decode, params)

    async def _prefill(self, ctx: RequestContext, decode: Worker) -> dict[str, Any] | None:
        """P's returned kv_transfer_params, or None when D should prefill locally."""
        body = dict(ctx.body)
        body["max_tokens"] = 1
        if "max_completion_tokens" in body:
            body["max_completion_tokens"] = 1
        body["stream"] = False
        for name in _PREFILL_DROP:
            body.pop(name, None)
        if body.get("n", 1) != 1:
            body["n"] = 1  # P only has to fill the cache once for all n samples
        headers = self._headers(ctx)
        tried: list[Worker] = []
        last_error: ProxyError | None = None
        t0 = time.perf_counter()
        for attempt in range(1, self._s.prefill_attempts + 1):
            worker = self._router.pick("prefill", ctx.prefix, tried, ctx.token_ids)
            if worker is None:
                break
            if attempt > 1:
                self._m.retries.labels("prefill", type(last_error).__name__).inc()
            tried.append(worker)
            ctx.prefill_attempts = attempt
            ctx.transfers += 1
            ctx.prefill_worker = worker.http
            body[kv_params.KV_TRANSFER_PARAMS] = {
                kv_params.DO_REMOTE_DECODE: True,
                kv_params.DO_REMOTE_PREFILL: False,
                "remote_engine_id": None,
                "remote_block_ids": None,
                "remote_host": None,
                "remote_port": None,
                kv_params.TRANSFER_ID: f"{ctx.request_id}-{ctx.transfers}",
                kv_params.PUSH_TARGET: decode.kv,
            }
            self._enter(worker, ctx.est_tokens)
            try:
                status, data = await self._client.fetch(
                    worker,
                    "POST",
                    ctx.path,
                    orjson.dumps(body),
                    headers,
                    self._s.timeouts.prefill,
                )
            except UpstreamError as exc:
                self._failure(worker)
                last_error = exc
                continue
            finally:
                self._leave(worker, ctx.est_tokens)
            if status != 200:
                error = UpstreamStatusError(worker.http, status, data)
                if not error.retryable:
                    raise error
                self._failure(worker)
                last_error = error
                continue
            try:
                answer = orjson.loads(data)
            except orjson.JSONDecodeError:
                self._failure(worker)
                last_error = UpstreamStatusError(worker.http, 502, b"")
                continue
            self._success(worker)
            elapsed = time.perf_counter() - t0
            ctx.prefill_ms = elapsed * 1000.0
            self._m.prefill_seconds.observe(elapsed)
            params = answer.get(kv_params.KV_TRANSFER_PARAMS) if isinstance(answer, dict) else None
            usage = answer.get("usage") if isinstance(answer, dict) else None
            if isinstance(usage, dict) and isinstance(usage.get("prompt_tokens"), int):
                ctx.prefill_prompt_tokens = usage["prompt_tokens"]
            if isinstance(params, dict):
                pushed = params.get(kv_params.NUM_TOKENS)
                if isinstance(pushed, int) and not isinstance(pushed, bool):
                    ctx.pushed_tokens = pushed
                return params
            return None
        reason = "prefill_failed" if tried else "no_prefill_worker"
        if self._s.local_fallback:
            ctx.fallback = reason
            self._m.fallbacks.labels(reason).inc()
            return None
        if last_error is not None:
            raise last_error
        raise NoWorkerAvailable("no healthy prefill worker")

    async def _decode(
        self,
        ctx: RequestContext,
        decode: Worker,
        params: dict[str, Any] | None,
    ) -> Reply:
        body = ctx.body
        if params is not None:
            body[kv_params.KV_TRANSFER_PARAMS] = params
        if ctx.stream and ctx.predicted_hit_tokens is not None:
            self._ask_for_usage(ctx)
        headers = self._headers(ctx)
        tried: list[Worker] = []
        worker: Worker | None = decode
        last_error: ProxyError | None = None
        n = body.get("n") or 1
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or 16
        tokens = ctx.est_tokens + int(n) * int(max_tokens)
        for attempt in range(1, self._s.decode_attempts + 1):
            if worker is None:
                break
            tried.append(worker)
            ctx.decode_attempts = attempt
            ctx.decode_worker = worker.http
            self._enter(worker, tokens)
            try:
                reply = await self._decode_once(ctx, worker, orjson.dumps(body), headers)
            except UpstreamStatusError as exc:
                self._leave(worker, tokens)
                if not exc.retryable:
                    raise
                self._failure(worker)
                last_error = exc
            except UpstreamError as exc:
                self._leave(worker, tokens)
                self._failure(worker)
                last_error = exc
            except BaseException:
                self._leave(worker, tokens)
                raise
            else:
                if reply.stream is None:
                    self._leave(worker, tokens)
                else:
                    reply.release = self._releaser(worker, tokens, reply.release)
                return reply
            # Retry before the first byte on another D. The KV (if any) went to the failed D,
            # so the new D either prefills locally or gets a fresh push.
            worker = self._router.pick("decode", ctx.prefix, tried, ctx.token_ids)
            ctx.predicted_hit_tokens = None  # the prediction was for the failed D
            if worker is None:
                break
            self._m.retries.labels("decode", type(last_error).__name__).inc()
            body.pop(kv_params.KV_TRANSFER_PARAMS, None)
            ctx.pushed_tokens = None
            if self._s.decode_retry_repush:
                new_params = await self._prefill(ctx, worker)
                if new_params is not None:
                    body[kv_params.KV_TRANSFER_PARAMS] = new_params
            else:
                ctx.fallback = "decode_retry"
                self._m.fallbacks.labels("decode_retry").inc()
        if last_error is not None:
            raise last_error
        raise NoWorkerAvailable("no healthy decode worker")

    @staticmethod
    def _ask_for_usage(ctx: RequestContext) -> None:
        """Streamed cache_aware request: have D end its stream with the usage event (its
        ``cached_tokens`` is the actual hit). A client that asked for usage gets it anyway. One
        that set ``continuous_usage_stats`` is left alone: with ``include_usage`` vLLM would put
        usage into every chunk the client gets, so the proxy only reads whatever usage comes."""
        options = ctx.body.get("stream_options")
        options = options if isinstance(options, dict) else {}
        if options.get("include_usage") or options.get("continuous_usage_stats"):
            return
        ctx.body["stream_options"] = {**options, "include_usage": True}
        ctx.usage_injected = True

    def _observe_actual(self, ctx: RequestContext, reported: int | None) -> None:
        """cache_aware: what D really had cached (its report, minus what P pushed to it)."""
        if reported is None or self._kv is None:
            return
        actual = max(reported - (ctx.pushed_tokens or 0), 0)
        self._m.actual_hit_tokens.observe(actual)
        self._kv.observe(ctx.predicted_hit_tokens or 0, actual)

    def _releaser(
        self, worker: Worker, tokens: int, then: Callable[[], None] | None
    ) -> Callable[[], None]:
        def release() -> None:
            self._leave(worker, tokens)
            if then is not None:
                then()

        return release

    async def _decode_once(
        self,
        ctx: RequestContext,
        worker: Worker,
        payload: bytes,
        headers: dict[str, str],
    ) -> Reply:
        """One attempt on D. Raises when it failed before anything could reach the client."""
        timeouts = self._s.timeouts
        started = time.perf_counter()  # reported timings
        first_deadline = timeouts.first_byte if ctx.stream else timeouts.decode
        up: UpstreamStream | None = None
        try:
            # One deadline until the first byte (streaming) or the whole answer (not streaming).
            async with asyncio.timeout(first_deadline):
                up = await self._client.open(worker, "POST", ctx.path, payload, headers, None)
                if up.status != 200:
                    data = await up.read_all(None, self._client.max_response)
                    raise UpstreamStatusError(worker.http, up.status, data)
                if ctx.stream:
                    first = await up.read(None)
                    if not first:
                        raise UpstreamStatusError(worker.http, 502, b"")
                else:
                    data = await up.read_all(None, self._client.max_response)
        except TimeoutError as exc:
            if up is not None:
                up.aclose()
            what = "no first byte" if ctx.stream else "no complete answer"
            raise UpstreamTimeout(worker.http, f"{what} within the deadline") from exc
        except BaseException:
            if up is not None:
                up.aclose()
            raise
        self._success(worker)
        elapsed = time.perf_counter() - started
        ctx.ttft_ms = elapsed * 1000.0
        self._m.decode_ttft_seconds.observe(elapsed)
        ctx.status = up.status
        if not ctx.stream:
            up.aclose()  # read to its end: the connection goes back to the pool
            if ctx.predicted_hit_tokens is not None:
                self._observe_actual(ctx, reported_cached_tokens(data))
            data = patch_json_body(data, ctx.pushed_tokens, ctx.prefill_prompt_tokens)
            return Reply(up.status, data, self._resp_headers(ctx))
        return Reply(
            up.status,
            headers=self._resp_headers(ctx),
            content_type=EVENT_STREAM,
            stream=self._relay(ctx, up, first),
            release=up.aclose,  # also when the stream is closed before it was iterated
        )

    async def _relay(
        self, ctx: RequestContext, up: UpstreamStream, first: bytes
    ) -> AsyncGenerator[bytes, None]:
        """D's SSE, chunk by chunk. Errors here can only be reported in-band. Owns ``up``."""
        try:
            patcher = self._usage_patcher(ctx)
            if patcher is not None:
                first = patcher.feed(first)
            if first:
                yield first
            idle = self._s.timeouts.idle
            try:
                while True:
                    data = await up.read(idle)
                    if not data:
                        break
                    if patcher is not None:
                        data = patcher.feed(data)
                    if data:
                        yield data
            except UpstreamError as exc:
                ctx.error = str(exc)
                ctx.status = 504 if isinstance(exc, UpstreamTimeout) else 502
                tail = patcher.flush() if patcher is not None else b""
                event = error_body(
                    exc.public_message, exc.error_type, ctx.status, request_id=ctx.request_id
                )
                yield tail + b"data: " + event + b"\n\n"
                return
            if patcher is not None:
                if ctx.predicted_hit_tokens is not None:
                    self._observe_actual(ctx, patcher.reported_cached)
                tail = patcher.flush()
                if tail:
                    yield tail
        finally:
            up.aclose()

    @staticmethod
    def _usage_patcher(ctx: RequestContext) -> SSEUsagePatcher | None:
        """What the relay needs from D's usage event: a fix (the client asked for usage), a read
        (cache_aware's actual hit) and the event dropped (the proxy asked for it); None: nothing,
        D's bytes go through untouched."""
        options = ctx.body.get("stream_options")
        client_usage = (
            not ctx.usage_injected
            and isinstance(options, dict)
            and bool(options.get("include_usage"))
        )
        fix = client_usage and (
            ctx.pushed_tokens is not None or ctx.prefill_prompt_tokens is not None
        )
        if not (fix or ctx.usage_injected or ctx.predicted_hit_tokens is not None):
            return None
        return SSEUsagePatcher(
            ctx.pushed_tokens if fix else None,
            ctx.prefill_prompt_tokens if fix else None,
            strip_usage_event=ctx.usage_injected,
        )

    @staticmethod
    def _resp_headers(ctx: RequestContext) -> tuple[tuple[bytes, bytes], ...]:
        return ((b"x-request-id", ctx.request_id.encode()),)
