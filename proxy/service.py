"""The proxy's per-process state and request logic, independent of the HTTP server.

:class:`ProxyApp` is built once per process by :func:`lmcache_disagg.proxy.app.create_app`.
``await start()`` (the app's lifespan) opens the upstream session and starts the health-check
task; the route handlers call its methods in the event loop thread; ``await stop()`` cancels the
background tasks and closes the session. Nothing here touches a socket: answers are
:class:`~lmcache_disagg.proxy.pd.Reply` values that the server adapter sends.

Keys are compared in constant time and are never logged: the access log carries only the request
id, route, status, chosen workers and timings.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import itertools
import logging
import os
import secrets
import time
from typing import Any

import orjson

from lmcache_disagg.errors import ConfigError
from lmcache_disagg.proxy.accesslog import AccessLog
from lmcache_disagg.proxy.cache_aware import CacheAwareSettings
from lmcache_disagg.proxy.errors import (
    ClientRequestError,
    NoWorkerAvailable,
    ProxyError,
    UpstreamStatusError,
)
from lmcache_disagg.proxy.kvprobe import KVPathProber
from lmcache_disagg.proxy.kvrouting import (
    KVRouting,
    KVRoutingSettings,
    KVRoutingStatsDelta,
    auto_events_port,
    event_sources,
    tokenizer_dir_from_models,
)
from lmcache_disagg.proxy.kvsync import SyncState
from lmcache_disagg.proxy.metrics import ProxyMetrics
from lmcache_disagg.proxy.pd import PDFlow, Reply, RequestContext, error_body
from lmcache_disagg.proxy.routing import Router
from lmcache_disagg.proxy.settings import ProxySettings, parse_worker_spec
from lmcache_disagg.proxy.sharedstate import SharedWorkerList
from lmcache_disagg.proxy.upstream import UpstreamClient
from lmcache_disagg.proxy.validation import (
    estimate_tokens,
    parse_body,
    prefix_key,
    sanitize_request_id,
    strip_internal,
)
from lmcache_disagg.proxy.workers import Role, Worker, WorkerPool

__all__ = ["ProxyApp"]

_log = logging.getLogger("lmcache_disagg.proxy")


class ProxyApp:
    """One proxy process's state and request handler."""

    def __init__(self, settings: ProxySettings) -> None:
        self.settings = settings
        self.metrics = ProxyMetrics(settings.metrics_dir)
        self.pool = WorkerPool(settings.breaker_threshold, settings.breaker_cooldown)
        self.pool.add_all(settings.prefill)
        self.pool.add_all(settings.decode)
        self.kv = _kv_routing(settings)
        self.router = Router(self.pool, settings.policy, self.kv)
        upstream_headers = {"content-type": "application/json"}
        if settings.worker_key:
            upstream_headers["authorization"] = f"Bearer {settings.worker_key}"
        self.client = UpstreamClient(
            settings.timeouts,
            settings.upstream_pool_size,
            max_response=64 * 1024 * 1024,
            headers=upstream_headers,
        )
        self.flow = PDFlow(settings, self.router, self.client, self.metrics, self.kv)
        self._kv_synced = KVRoutingStatsDelta()
        self._kv_exported_workers: set[str] = set()
        self._tokenizer_warned = False
        self.inflight = 0
        # Request ids: a random per-process prefix plus a counter (cheaper than uuid4 per request).
        self._rid_prefix = secrets.token_hex(6)
        self._rid_counter = itertools.count(1)
        self._request_counters: dict[tuple[str, int], Any] = {}
        self._access = AccessLog() if settings.access_log else None
        self._access_task: asyncio.Task[None] | None = None
        self._kv_prober = (
            KVPathProber(settings.timeouts.health, settings.cluster_secret, self.metrics)
            if settings.kv_probe
            else None
        )
        self._shared = (
            SharedWorkerList(settings.state_file, self.pool) if settings.state_file else None
        )
        self._health_task: asyncio.Task[None] | None = None
        self._probe_tasks: set[asyncio.Task[None]] = set()
        self._retry_after = str(settings.retry_after).encode()
        self._api_key = f"Bearer {settings.api_key}".encode() if settings.api_key else None
        self._admin_key = f"Bearer {settings.admin_key}".encode() if settings.admin_key else None

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        await self.client.start()
        if self.kv is not None:
            self.kv.start()
        await self._check_all()
        loop = asyncio.get_running_loop()
        self._health_task = loop.create_task(self._health_loop(), name="lmcache-proxy-health")
        if self._access is not None:
            self._access_task = loop.create_task(self._access.run(), name="lmcache-proxy-access")

    async def stop(self) -> None:
        tasks = [
            t for t in (self._health_task, self._access_task, *self._probe_tasks) if t is not None
        ]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.client.close()
        if self.kv is not None:
            self.kv.close()
        if self._access is not None:
            self._access.flush()
        if self._kv_prober is not None:
            self._kv_prober.shutdown()
        if self.settings.metrics_dir is not None:
            from prometheus_client import multiprocess

            # Drop this process's live gauges (in-flight, breaker, health) from the merge.
            multiprocess.mark_process_dead(os.getpid(), self.settings.metrics_dir)

    # -- health -----------------------------------------------------------------------------
    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.health_interval)
            if self._shared is not None:
                self._shared.load()  # new workers are probed by the round below
                self._follow_kv_events()
            await self._check_all()

    async def _check_all(self) -> None:
        workers = list(self.pool)
        if workers:
            await asyncio.gather(*(self._check(w) for w in workers))
        if self.kv is not None:
            if self.kv.tokenizer is None:
                await self._find_tokenizer()
            self._export_kv_stats()

    async def _find_tokenizer(self) -> None:
        """cache_aware without --tokenizer: use the workers' model if it is a local directory."""
        assert self.kv is not None
        for worker in self.pool:
            if not worker.healthy:
                continue
            try:
                status, body = await self.client.fetch(
                    worker, "GET", "/v1/models", None, None, self.settings.timeouts.health
                )
                models = orjson.loads(body) if status == 200 else None
            except (ProxyError, orjson.JSONDecodeError):
                continue
            directory = tokenizer_dir_from_models(models)
            if directory is not None:
                try:
                    self.kv.set_tokenizer(directory)
                except (ConfigError, OSError, ValueError) as exc:
                    _log.warning("cache_aware: cannot load the tokenizer of %s: %s", directory, exc)
                    continue
                _log.info("cache_aware: tokenizing with %s (from %s)", directory, worker.http)
                return
        if not self._tokenizer_warned:
            self._tokenizer_warned = True
            _log.warning(
                "cache_aware: no tokenizer yet (pass --tokenizer DIR); routing by load meanwhile"
            )

    def _export_kv_stats(self) -> None:
        assert self.kv is not None
        stats = self.kv.stats()
        m = self.metrics
        m.kv_index_keys.set(stats.index_keys)
        for worker, keys in stats.worker_keys.items():
            m.kv_worker_keys.labels(worker).set(keys)
        # A worker that expired or was removed has left the index: it lists no keys now (set to 0
        # rather than removed, which prometheus_client's multiprocess mode cannot merge).
        for worker in self._kv_exported_workers - stats.worker_keys.keys():
            m.kv_worker_keys.labels(worker).set(0)
        self._kv_exported_workers = set(stats.worker_keys)
        for state in SyncState:
            m.kv_sources.labels(state.value).set(
                sum(1 for s in stats.sources.values() if s is state)
            )
        delta = self._kv_synced.advance(stats)
        m.kv_events.inc(delta.events_received)
        m.kv_events_lost.inc(delta.batches_lost)
        m.kv_resyncs.inc(delta.resyncs)
        m.kv_invalid.inc(delta.invalid_messages)

    async def _check(self, worker: Worker) -> None:
        try:
            status, _ = await self.client.fetch(
                worker, "GET", "/health", None, None, self.settings.timeouts.health
            )
            healthy = status == 200
        except ProxyError:
            healthy = False
        if healthy and worker.role == "decode" and self._kv_prober is not None:
            healthy = await self._kv_prober.check(worker.kv)
        if healthy != worker.healthy:
            _log.info("worker %s %s is now %s", worker.role, worker.http,
                      "healthy" if healthy else "unhealthy")  # fmt: skip
        worker.healthy = healthy
        self.metrics.worker_healthy.labels(worker.role, worker.http).set(int(healthy))
        self.metrics.breaker_state.labels(worker.role, worker.http).set(worker.breaker.state)

    # -- generate requests (called by the ASGI adapter, asgi.py) -----------------------------
    def request_id(self, given: bytes | None) -> str:
        """The client's X-Request-Id if it is safe, else a fresh one."""
        return sanitize_request_id(given) or f"{self._rid_prefix}-{next(self._rid_counter):x}"

    def refuse(self, authorization: bytes | None, rid: str) -> Reply | None:
        """A 401 or 429 answer if the request may not run, else None (and it is admitted:
        call :meth:`finish` when it ends)."""
        if self._api_key is not None and not hmac.compare_digest(
            authorization or b"", self._api_key
        ):
            return self.error(401, "invalid or missing API key", "authentication_error", rid)
        if self.inflight >= self.settings.max_concurrency:
            self.metrics.rejected.labels("concurrency").inc()
            return self.error(
                429, "too many concurrent requests; retry later", "rate_limit_error", rid,
                headers=((b"retry-after", self._retry_after),),
            )  # fmt: skip
        self.inflight += 1
        return None

    def error(
        self, status: int, message: str, kind: str, rid: str | None = None,
        param: str | None = None, headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> Reply:  # fmt: skip
        return Reply(status, error_body(message, kind, status, param, rid), headers)

    async def generate(
        self, rid: str, path: str, chat: bool, raw: bytes
    ) -> tuple[Reply, RequestContext | None]:
        """Run one admitted request; never raises for a request's own failure."""
        ctx: RequestContext | None = None
        try:
            body = parse_body(raw, chat, self.settings.max_tokens_limit)
            dropped = strip_internal(body)
            for name in dropped:
                self.metrics.internal_fields_dropped.labels(name).inc()
                _log.warning("request %s: dropped client-supplied internal field %r", rid, name)
            token_ids = self.kv.tokens(body) if self.kv is not None else None
            ctx = RequestContext(
                request_id=rid,
                path=path,
                body=body,
                stream=bool(body.get("stream")),
                est_tokens=len(token_ids) if token_ids else estimate_tokens(body),
                prefix=prefix_key(body),
                token_ids=token_ids,
            )
            return await self.flow.run(ctx), ctx
        except ClientRequestError as exc:
            return self.error(exc.status, str(exc), exc.error_type, rid, exc.param), ctx
        except UpstreamStatusError as exc:
            _log.warning("request %s: %s", rid, exc)
            if ctx is not None:
                ctx.error = str(exc)
            if 400 <= exc.upstream_status < 500 and exc.body:
                return Reply(exc.upstream_status, exc.body), ctx  # upstream 4xx passes through
            return self.error(exc.status, exc.public_message, exc.error_type, rid), ctx
        except ProxyError as exc:
            _log.warning("request %s: %s", rid, exc)
            if ctx is not None:
                ctx.error = str(exc)
            retry = (b"retry-after", self._retry_after)
            headers = (retry,) if isinstance(exc, NoWorkerAvailable) else ()
            reply = self.error(exc.status, exc.public_message, exc.error_type, rid, headers=headers)
            return reply, ctx

    def finish(
        self, rid: str, chat: bool, status: int, started: float, ctx: RequestContext | None
    ) -> None:
        """Book one admitted request that ended with ``status`` (499: the client went away)."""
        self.inflight -= 1
        if ctx is not None and ctx.status and status == 200:
            status = ctx.status  # a mid-stream failure is booked as what it was
        self.count(chat, status, started, rid, ctx)

    def count(
        self, chat: bool, status: int, started: float, rid: str, ctx: RequestContext | None = None
    ) -> None:
        route = "chat" if chat else "completions"
        counter = self._request_counters.get((route, status))
        if counter is None:
            counter = self.metrics.requests.labels(route, str(status))
            if len(self._request_counters) < 1024:
                self._request_counters[(route, status)] = counter
        counter.inc()
        elapsed = time.perf_counter() - started
        self.metrics.e2e_seconds.observe(elapsed)
        if self._access is not None:
            self._log_request(rid, route, status, elapsed, ctx)

    def _log_request(
        self, rid: str, route: str, status: int, elapsed: float, ctx: RequestContext | None
    ) -> None:
        record: dict[str, Any] = {
            "request_id": rid,
            "route": route,
            "status": status,
            "total_ms": round(elapsed * 1000.0, 3),
        }
        if ctx is not None:
            record.update(
                prefill=ctx.prefill_worker,
                decode=ctx.decode_worker,
                prefill_ms=None if ctx.prefill_ms is None else round(ctx.prefill_ms, 3),
                ttft_ms=None if ctx.ttft_ms is None else round(ctx.ttft_ms, 3),
                prefill_attempts=ctx.prefill_attempts,
                decode_attempts=ctx.decode_attempts,
                fallback=ctx.fallback,
                stream=ctx.stream,
                error=ctx.error,
            )
        assert self._access is not None
        self._access.emit(record)

    # -- /v1/models -------------------------------------------------------------------------
    async def models(self) -> Reply:
        workers = [w for w in self.pool if w.healthy]

        async def one(worker: Worker) -> list[Any]:
            try:
                status, data = await self.client.fetch(
                    worker, "GET", "/v1/models", None, None, self.settings.timeouts.health
                )
                if status != 200:
                    return []
                listed = orjson.loads(data).get("data")
                return listed if isinstance(listed, list) else []
            except (ProxyError, orjson.JSONDecodeError, AttributeError):
                return []

        results = await asyncio.gather(*(one(w) for w in workers))
        merged: dict[str, Any] = {}
        for listed in results:
            for model in listed:
                if isinstance(model, dict) and isinstance(model.get("id"), str):
                    merged.setdefault(model["id"], model)
        if not merged:
            return self.error(503, "no healthy worker listed a model", "service_unavailable")
        return Reply(200, orjson.dumps({"object": "list", "data": list(merged.values())}))

    def ready(self) -> tuple[bool, int, int]:
        """Readiness and the healthy P and D counts."""
        return (
            self.pool.ready(),
            sum(w.healthy for w in self.pool.role("prefill")),
            sum(w.healthy for w in self.pool.role("decode")),
        )

    # -- /workers ---------------------------------------------------------------------------
    def api_refusal(self, authorization: bytes | None) -> Reply | None:
        if self._api_key is None or hmac.compare_digest(authorization or b"", self._api_key):
            return None
        return self.error(401, "invalid or missing API key", "authentication_error")

    def admin_refusal(self, authorization: bytes | None) -> Reply | None:
        if self._admin_key is None:
            return self.error(403, "set an admin key to use /workers", "permission_error")
        if not hmac.compare_digest(authorization or b"", self._admin_key):
            return self.error(401, "invalid or missing API key", "authentication_error")
        return None

    def list_workers(self) -> list[dict[str, object]]:
        return [w.describe() for w in self.pool]

    def _sync_shared(self) -> None:
        if self._shared is not None:
            for added in self._shared.load():
                self._probe(added)

    def _follow_kv_events(self) -> None:
        """cache_aware: subscribe to the KV events of exactly the workers in the pool."""
        if self.kv is not None:
            self.kv.follow([(w.http, w.events) for w in self.pool])

    def add_worker(
        self, role: Role, http: str, kv: str | None, kv_events: str | None = None
    ) -> Worker:
        """Raises ConfigError for a bad address or events endpoint."""
        self._sync_shared()
        text = http if kv is None else f"{http},kv={kv}"
        spec = parse_worker_spec(role, text)
        if kv_events is not None:
            if self.kv is None:
                raise ConfigError("kv_events is used by --policy cache_aware only")
            self.kv.event_source(spec.http, kv_events)  # validates it before anything changes
            spec = dataclasses.replace(spec, events=kv_events)
        worker = self.pool.add(spec)
        if self._shared is not None:
            self._shared.save()
        self._follow_kv_events()
        self._probe(worker)
        return worker

    def remove_worker(self, role: Role, http: str) -> bool:
        self._sync_shared()
        removed = self.pool.remove(role, http)
        if removed and self._shared is not None:
            self._shared.save()
        self._follow_kv_events()
        return removed

    def _probe(self, worker: Worker) -> None:
        """Health-check a newly added worker now rather than at the next round."""
        probe = asyncio.get_running_loop().create_task(self._check(worker))
        self._probe_tasks.add(probe)
        probe.add_done_callback(self._probe_tasks.discard)


def _kv_routing(settings: ProxySettings) -> KVRouting | None:
    """cache_aware's tokenizer, index and event subscriber (None for the other policies)."""
    if settings.policy != "cache_aware":
        return None
    workers = [w.http for w in (*settings.prefill, *settings.decode)]
    specs = settings.kv_events or ("auto",)
    sources = event_sources(specs, workers)
    skip = settings.skip_prefill_chunks
    policy = CacheAwareSettings(skip_prefill_chunks=None if skip < 0 else skip)
    return KVRouting(
        KVRoutingSettings(
            settings.tokenizer, sources, policy, auto_events_port=auto_events_port(specs)
        )
    )
