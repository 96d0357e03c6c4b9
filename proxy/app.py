"""The proxy application: routes, auth, admission control, health checks and the access log.

:class:`ProxyApp` is built once per process. ``await app.start()`` opens the upstream pool and
starts the health-check task; :meth:`ProxyApp.handle` is the HTTP server's handler (one call per
request, event loop thread); ``await app.stop()`` cancels the health task and closes the pool.

Routes::

    POST /v1/completions, /v1/chat/completions   the PD flow (pd.py)
    GET  /v1/models                               union of the healthy workers' models
    GET  /health                                  liveness (always 200 while serving)
    GET  /ready                                   200 iff >=1 healthy P and >=1 healthy D, else 503
    GET  /metrics                                 Prometheus text format
    GET|POST|DELETE /workers                      list / add / remove workers (admin key)

Keys are compared in constant time and are never logged: the access log carries only the request
id, route, status, chosen workers and timings.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import logging
import secrets
import time
from typing import Any

import orjson

from lmcache_disagg.errors import ConfigError
from lmcache_disagg.proxy.accesslog import AccessLog
from lmcache_disagg.proxy.errors import (
    ClientRequestError,
    NoWorkerAvailable,
    ProxyError,
    UpstreamStatusError,
)
from lmcache_disagg.proxy.httpserver import Request, Responder
from lmcache_disagg.proxy.kvprobe import KVPathProber
from lmcache_disagg.proxy.metrics import ProxyMetrics
from lmcache_disagg.proxy.pd import PDFlow, RequestContext, error_body
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
from lmcache_disagg.proxy.workers import Worker, WorkerPool

__all__ = ["ProxyApp"]

_log = logging.getLogger("lmcache_disagg.proxy")
_GENERATE_ROUTES = {"/v1/completions": False, "/v1/chat/completions": True}
_PROM_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


class ProxyApp:
    """One proxy process's state and request handler."""

    def __init__(self, settings: ProxySettings) -> None:
        self.settings = settings
        self.metrics = ProxyMetrics(settings.metrics_dir)
        self.pool = WorkerPool(settings.breaker_threshold, settings.breaker_cooldown)
        self.pool.add_all(settings.prefill)
        self.pool.add_all(settings.decode)
        self.router = Router(self.pool, settings.policy)
        self.client = UpstreamClient(
            settings.timeouts, settings.upstream_pool_size, max_response=64 * 1024 * 1024
        )
        self.flow = PDFlow(settings, self.router, self.client, self.metrics)
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
        self._worker_headers = (
            f"authorization: Bearer {settings.worker_key}\r\n".encode()
            if settings.worker_key
            else b""
        )

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        await self.client.start()
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
        if self._access is not None:
            self._access.flush()
        if self._kv_prober is not None:
            self._kv_prober.shutdown()

    # -- health -----------------------------------------------------------------------------
    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.health_interval)
            if self._shared is not None:
                self._shared.load()  # new workers are probed by the round below
            await self._check_all()

    async def _check_all(self) -> None:
        workers = list(self.pool)
        if workers:
            await asyncio.gather(*(self._check(w) for w in workers))

    async def _check(self, worker: Worker) -> None:
        try:
            status, _ = await self.client.fetch(
                worker, "GET", "/health", None, self._worker_headers, self.settings.timeouts.health
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

    # -- request entry ----------------------------------------------------------------------
    async def handle(self, req: Request, resp: Responder) -> None:
        path = req.path
        chat = _GENERATE_ROUTES.get(path)
        if chat is not None:
            if req.method != b"POST":
                self._error(resp, 405, "use POST", "invalid_request_error")
                return
            await self._generate(req, resp, chat)
            return
        if path == "/health":
            resp.send(200, b'{"status":"ok"}')
        elif path == "/ready":
            ready = self.pool.ready()
            body = {
                "ready": ready,
                "prefill_healthy": sum(w.healthy for w in self.pool.role("prefill")),
                "decode_healthy": sum(w.healthy for w in self.pool.role("decode")),
            }
            resp.send(200 if ready else 503, orjson.dumps(body))
        elif path == "/metrics":
            resp.send(200, self.metrics.render(), content_type=_PROM_TYPE)
        elif path == "/v1/models":
            if self._authorized(req, self._api_key, resp):
                await self._models(resp)
        elif path == "/workers":
            await self._workers(req, resp)
        else:
            self._error(resp, 404, f"no route {path}", "not_found_error")

    def _error(
        self, resp: Responder, status: int, message: str, kind: str, param: str | None = None,
        headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:  # fmt: skip
        resp.send(status, error_body(message, kind, status, param), headers)

    def _authorized(self, req: Request, key: bytes | None, resp: Responder) -> bool:
        if key is None:
            return True
        given = req.headers.get(b"authorization", b"")
        if hmac.compare_digest(given, key):
            return True
        self._error(resp, 401, "invalid or missing API key", "authentication_error")
        return False

    async def _generate(self, req: Request, resp: Responder, chat: bool) -> None:
        route = "chat" if chat else "completions"
        rid = sanitize_request_id(req.headers.get(b"x-request-id")) or (
            f"{self._rid_prefix}-{next(self._rid_counter):x}"
        )
        ctx: RequestContext | None = None
        status = 0
        started = time.perf_counter()
        admitted = False
        try:
            if not self._authorized(req, self._api_key, resp):
                status = 401
                return
            if self.inflight >= self.settings.max_concurrency:
                self.metrics.rejected.labels("concurrency").inc()
                status = 429
                self._error(
                    resp, 429, "too many concurrent requests; retry later", "rate_limit_error",
                    headers=((b"retry-after", self._retry_after),),
                )  # fmt: skip
                return
            self.inflight += 1
            admitted = True
            body = parse_body(req.body, chat, self.settings.max_tokens_limit)
            dropped = strip_internal(body)
            for name in dropped:
                self.metrics.internal_fields_dropped.labels(name).inc()
                _log.warning("request %s: dropped client-supplied internal field %r", rid, name)
            ctx = RequestContext(
                request_id=rid,
                path=req.path,
                body=body,
                stream=bool(body.get("stream")),
                est_tokens=estimate_tokens(body),
                prefix=prefix_key(body),
                started=started,
            )
            await self.flow.run(ctx, resp)
            status = ctx.status
        except ClientRequestError as exc:
            status = exc.status
            self._error(resp, exc.status, str(exc), exc.error_type, exc.param)
        except UpstreamStatusError as exc:
            status = exc.status
            if 400 <= exc.upstream_status < 500 and exc.body:
                resp.send(exc.upstream_status, exc.body)  # upstream 4xx passes through
            else:
                self._error(resp, exc.status, str(exc), exc.error_type)
        except ProxyError as exc:
            status = exc.status
            if ctx is not None:
                ctx.error = str(exc)
            if not resp.started:
                retry = (b"retry-after", self._retry_after)
                headers = (retry,) if isinstance(exc, NoWorkerAvailable) else ()
                self._error(resp, exc.status, str(exc), exc.error_type, headers=headers)
        except asyncio.CancelledError:
            status = 499  # client went away; upstream calls were cancelled with us
            raise
        except (ConnectionError, TimeoutError):
            status = 499  # client stopped reading (write deadline) or reset the connection
            resp.abort()
        finally:
            if admitted:
                self.inflight -= 1
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
    async def _models(self, resp: Responder) -> None:
        workers = [w for w in self.pool if w.healthy]

        async def one(worker: Worker) -> list[Any]:
            try:
                status, data = await self.client.fetch(
                    worker, "GET", "/v1/models", None, self._worker_headers,
                    self.settings.timeouts.health,
                )  # fmt: skip
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
            self._error(resp, 503, "no healthy worker listed a model", "service_unavailable")
            return
        resp.send(200, orjson.dumps({"object": "list", "data": list(merged.values())}))

    # -- /workers ---------------------------------------------------------------------------
    async def _workers(self, req: Request, resp: Responder) -> None:
        if self._admin_key is None:
            self._error(resp, 403, "set an admin key to use /workers", "permission_error")
            return
        if not self._authorized(req, self._admin_key, resp):
            return
        if req.method == b"GET":
            resp.send(200, orjson.dumps({"workers": [w.describe() for w in self.pool]}))
            return
        if req.method not in (b"POST", b"DELETE"):
            self._error(resp, 405, "use GET, POST or DELETE", "invalid_request_error")
            return
        try:
            spec = orjson.loads(req.body)
        except orjson.JSONDecodeError:
            spec = None
        role = spec.get("role") if isinstance(spec, dict) else None
        http = spec.get("http") if isinstance(spec, dict) else None
        if role not in ("prefill", "decode") or not isinstance(http, str):
            self._error(resp, 400, "expected {\"role\": \"prefill\"|\"decode\", \"http\": "
                        "\"host:port\"[, \"kv\": \"host:port\"]}", "invalid_request_error")  # fmt: skip
            return
        assert isinstance(spec, dict)
        if self._shared is not None:
            for added in self._shared.load():
                self._probe(added)
        if req.method == b"DELETE":
            if self.pool.remove(role, http):
                if self._shared is not None:
                    self._shared.save()
                resp.send(200, b'{"removed":true}')
            else:
                self._error(resp, 404, f"no {role} worker {http}", "not_found_error")
            return
        kv = spec.get("kv")
        text = http if not isinstance(kv, str) else f"{http},kv={kv}"
        try:
            worker = self.pool.add(parse_worker_spec(role, text))
        except ConfigError as exc:
            self._error(resp, 400, str(exc), "invalid_request_error")
            return
        if self._shared is not None:
            self._shared.save()
        self._probe(worker)
        resp.send(200, orjson.dumps({"added": worker.describe()}))

    def _probe(self, worker: Worker) -> None:
        """Health-check a newly added worker now rather than at the next round."""
        probe = asyncio.get_running_loop().create_task(self._check(worker))
        self._probe_tasks.add(probe)
        probe.add_done_callback(self._probe_tasks.discard)
