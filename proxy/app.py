"""The proxy as a FastAPI application: :func:`create_app` (DESIGN "Proxy").

Routes::

    POST /v1/completions, /v1/chat/completions   the PD flow (pd.py), raw ASGI endpoints (asgi.py)
    GET  /v1/models                               union of the healthy workers' models
    GET  /health                                  liveness (always 200 while serving)
    GET  /ready                                   200 iff >=1 healthy P and >=1 healthy D, else 503
    GET  /metrics                                 Prometheus text format
    GET|POST|DELETE /workers                      list / add / remove workers (admin key)
    GET  /docs, /openapi.json                     only with ``settings.docs``

Each route answers only its methods (405 with ``Allow`` otherwise); every GET route answers HEAD.
Every error is an OpenAI-style JSON object. ``lmcache-disagg-proxy`` serves the app on uvicorn
(server.py). It can also be mounted in another FastAPI/Starlette app, under that app's own
middleware (auth, tracing, rate limits); the host app must run this app's lifespan, which starts
the health checks and the upstream session::

    pd = create_app(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        async with pd.router.lifespan_context(pd):
            yield

    gateway = FastAPI(lifespan=lifespan)
    gateway.mount("/pd", pd)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any, Literal

import orjson
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Route

from lmcache_disagg.errors import ConfigError
from lmcache_disagg.proxy import statusline
from lmcache_disagg.proxy.asgi import GenerateEndpoint
from lmcache_disagg.proxy.pd import Reply
from lmcache_disagg.proxy.service import ProxyApp
from lmcache_disagg.proxy.settings import ProxySettings

__all__ = ["ProxyAPI", "WorkerIn", "WorkerList", "WorkerOut", "create_app"]

_PROM_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_READ = ["GET", "HEAD"]
_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error"}


class WorkerIn(BaseModel):
    """A worker to add or remove."""

    role: Literal["prefill", "decode"]
    http: str
    """``host:port`` of its HTTP server."""
    kv: str | None = None
    """Decode only: ``host:port`` of its KV listener (default: host + the configured port)."""
    kv_events: str | None = None
    """cache_aware: its KV events endpoint, ``tcp://HOST:PORT[,snapshot=tcp://HOST:PORT]``
    (default: its host at the ``--kv-events auto`` port)."""


class WorkerOut(BaseModel):
    role: Literal["prefill", "decode"]
    http: str
    kv: str | None
    healthy: bool
    breaker: Literal["closed", "open", "half_open"]
    inflight: int
    outstanding_tokens: int


class WorkerList(BaseModel):
    workers: list[WorkerOut]


class WorkerAdded(BaseModel):
    added: WorkerOut


class WorkerRemoved(BaseModel):
    removed: bool


class _Refused(Exception):
    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.status)
        self.reply = reply


def _response(reply: Reply) -> Response:
    headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in reply.headers}
    return Response(
        reply.body, reply.status, headers, media_type=reply.content_type.decode("latin-1")
    )


def _authorization(request: Request) -> bytes | None:
    value = request.headers.get("authorization")
    return None if value is None else value.encode("latin-1")


class ProxyAPI(FastAPI):
    """FastAPI, plus a direct path to the generate endpoints while nothing needs to wrap them.

    With no middleware added to this app and no mount prefix, a generate request skips
    Starlette's error/exception middleware and the router (a few per cent of the proxy's CPU in
    the profile; the endpoints answer their own errors). Middleware added with
    ``add_middleware``, or a gateway this app is mounted in, always wraps them.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.direct_routes: dict[str, GenerateEndpoint] = {}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and not self.user_middleware and not scope.get("root_path"):
            endpoint = self.direct_routes.get(scope["path"])
            if endpoint is not None:
                await endpoint(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


def create_app(settings: ProxySettings) -> FastAPI:
    """The PD proxy for ``settings``; one per process (it owns the upstream session)."""
    proxy = ProxyApp(settings)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await proxy.start()
        status = asyncio.create_task(
            statusline.run(
                settings.status_interval,
                lambda: proxy.metrics.render().decode(),
                lambda: [worker.base_url for worker in proxy.pool],
            )
        )
        try:
            yield
        finally:
            status.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await status
            await proxy.stop()

    app = ProxyAPI(
        title="lmcache-disagg proxy",
        lifespan=lifespan,
        docs_url="/docs" if settings.docs else None,
        redoc_url=None,
        openapi_url="/openapi.json" if settings.docs else None,
    )
    app.state.proxy = proxy

    # The hot routes: raw ASGI endpoints (they check their method themselves, for a JSON 405).
    for path, chat in (("/v1/completions", False), ("/v1/chat/completions", True)):
        endpoint = GenerateEndpoint(proxy, chat)
        app.router.routes.append(Route(path, endpoint))
        app.direct_routes[path] = endpoint

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> Response:
        kind = _ERROR_TYPES.get(exc.status_code, "invalid_request_error")
        reply = proxy.error(exc.status_code, str(exc.detail), kind)
        response = _response(reply)
        for name, value in (exc.headers or {}).items():
            response.headers[name] = value
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> Response:
        errors = exc.errors()
        where = errors[0].get("loc", ()) if errors else ()
        param = ".".join(str(part) for part in where[1:]) or None
        message = errors[0].get("msg", "invalid request") if errors else "invalid request"
        return _response(proxy.error(400, str(message), "invalid_request_error", param=param))

    @app.exception_handler(_Refused)
    async def refused(_request: Request, exc: _Refused) -> Response:
        return _response(exc.reply)

    @app.api_route("/health", methods=_READ, include_in_schema=False)
    async def health() -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    @app.api_route("/ready", methods=_READ, include_in_schema=False)
    async def ready() -> Response:
        ok, prefill, decode = proxy.ready()
        body = {"ready": ok, "prefill_healthy": prefill, "decode_healthy": decode}
        return _response(Reply(200 if ok else 503, orjson.dumps(body)))

    @app.api_route("/metrics", methods=_READ, include_in_schema=False)
    async def metrics() -> Response:
        return Response(proxy.metrics.render(), media_type=_PROM_TYPE)

    @app.api_route("/v1/models", methods=_READ, include_in_schema=False)
    async def models(request: Request) -> Response:
        refusal = proxy.api_refusal(_authorization(request))
        if refusal is not None:
            return _response(refusal)
        return _response(await proxy.models())

    def admin(request: Request) -> None:
        refusal = proxy.admin_refusal(_authorization(request))
        if refusal is not None:
            raise _Refused(refusal)

    guarded = {"tags": ["admin"], "dependencies": [Depends(admin)]}

    @app.get("/workers", response_model=WorkerList, **guarded)  # type: ignore[arg-type]
    async def list_workers() -> WorkerList:
        """All workers with their health, breaker state and load."""
        return WorkerList.model_validate({"workers": proxy.list_workers()})

    @app.post("/workers", response_model=WorkerAdded, **guarded)  # type: ignore[arg-type]
    async def add_worker(spec: WorkerIn) -> WorkerAdded:
        """Add a worker (it takes traffic once its first health check passes)."""
        try:
            worker = proxy.add_worker(spec.role, spec.http, spec.kv, spec.kv_events)
        except ConfigError as exc:
            raise _Refused(proxy.error(400, str(exc), "invalid_request_error")) from None
        return WorkerAdded.model_validate({"added": worker.describe()})

    @app.delete("/workers", response_model=WorkerRemoved, **guarded)  # type: ignore[arg-type]
    async def remove_worker(spec: WorkerIn) -> WorkerRemoved:
        """Remove a worker; requests already running on it finish."""
        if not proxy.remove_worker(spec.role, spec.http):
            raise _Refused(
                proxy.error(404, f"no {spec.role} worker {spec.http}", "not_found_error")
            )
        return WorkerRemoved(removed=True)

    return app
