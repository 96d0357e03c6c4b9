"""The FastAPI app: mounted in a user's own gateway under its middleware, OpenAPI and /docs."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import httpx

from lmcache_disagg.bench.cluster import Proc, free_port
from lmcache_disagg.proxy.app import create_app
from lmcache_disagg.proxy.settings import ProxySettings, parse_worker_spec
from tests.proxy.utils import Cluster, completion, sse_events, wait_for

GATEWAY = """
import contextlib

from fastapi import FastAPI
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.responses import JSONResponse

from lmcache_disagg.proxy.app import create_app
from lmcache_disagg.proxy.settings import ProxySettings, parse_worker_spec

pd = create_app(ProxySettings(
    prefill=(parse_worker_spec("prefill", "{p}"),),
    decode=(parse_worker_spec("decode", "{d}"),),
    health_interval=0.2,
))


class GatewayAuth(BaseHTTPMiddleware):
    async def dispatch(self, request, call_next):
        if request.headers.get("x-gateway-key") != "gw-secret":
            return JSONResponse({{"gateway": "refused"}}, status_code=403)
        response = await call_next(request)
        response.headers["x-gateway"] = "seen"
        return response


@contextlib.asynccontextmanager
async def lifespan(app):
    async with pd.router.lifespan_context(pd):
        yield


app = FastAPI(lifespan=lifespan)
app.add_middleware(GatewayAuth)
app.mount("/pd", pd)


@app.get("/own")
async def own():
    return {{"own": True}}
"""


def _answers(url: str, headers: dict[str, str]) -> bool:
    try:
        return httpx.get(url, headers=headers, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_mounted_in_a_gateway_with_its_own_middleware(cluster: Cluster, tmp_path: Path) -> None:
    (tmp_path / "gateway.py").write_text(
        textwrap.dedent(GATEWAY).format(p=cluster["p0"].addr, d=cluster["d0"].addr)
    )
    port = free_port()
    proc = Proc(
        "gateway",
        [sys.executable, "-m", "uvicorn", "gateway:app", "--port", str(port), "--app-dir",
         str(tmp_path), "--loop", "uvloop", "--http", "httptools"],
        tmp_path / "gateway.log",
        {**__import__("os").environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        key = {"x-gateway-key": "gw-secret"}
        assert wait_for(lambda: _answers(f"{url}/pd/health", key), timeout=20), proc.log_text()
        assert httpx.get(f"{url}/own", headers=key, timeout=5).json() == {"own": True}
        # The gateway's middleware wraps every proxy route, the generate routes included.
        refused = httpx.post(f"{url}/pd/v1/completions", json=completion(), timeout=5)
        assert refused.status_code == 403 and refused.json() == {"gateway": "refused"}
        assert cluster["d0"].requests() == []
        ready = httpx.get(f"{url}/pd/ready", headers=key, timeout=5)
        assert ready.status_code in (200, 503)
        resp = httpx.post(f"{url}/pd/v1/completions", json=completion(), headers=key, timeout=10)
        assert resp.status_code == 200, resp.text
        assert resp.headers["x-gateway"] == "seen"
        assert resp.json()["choices"][0]["text"] == " tok0 tok1 tok2 tok3"
        stream = httpx.post(
            f"{url}/pd/v1/chat/completions",
            json={"model": "stub-model", "messages": [{"role": "user", "content": "hi"}],
                  "max_tokens": 3, "stream": True},
            headers=key, timeout=10,
        )  # fmt: skip
        assert stream.status_code == 200 and sse_events(stream.text)[-1] == "[DONE]"
        # The workers got the proxy's own paths, not the gateway's.
        assert [r["path"] for r in cluster["d0"].requests()] == [
            "/v1/completions",
            "/v1/chat/completions",
        ]
        assert httpx.get(f"{url}/pd/health", headers=key, timeout=5).json() == {"status": "ok"}
    finally:
        proc.stop()


def test_openapi_describes_the_admin_api_and_docs_are_behind_a_flag(cluster: Cluster) -> None:
    settings = ProxySettings(decode=(parse_worker_spec("decode", "127.0.0.1:9"),), docs=True)
    schema = create_app(settings).openapi()
    workers = schema["paths"]["/workers"]
    assert set(workers) == {"get", "post", "delete"}
    assert "WorkerIn" in schema["components"]["schemas"]
    assert "WorkerOut" in schema["components"]["schemas"]
    plain = cluster.proxy()
    assert httpx.get(plain.url + "/docs", timeout=5).status_code == 404
    assert httpx.get(plain.url + "/openapi.json", timeout=5).status_code == 404
    documented = cluster.proxy(extra=["--docs"])
    assert httpx.get(documented.url + "/docs", timeout=5).status_code == 200
    served = httpx.get(documented.url + "/openapi.json", timeout=5).json()
    assert "/workers" in served["paths"]


def test_middleware_added_to_the_app_itself_wraps_the_generate_routes() -> None:
    import asyncio

    from starlette.middleware.base import BaseHTTPMiddleware
    from starlette.responses import JSONResponse

    class Refuse(BaseHTTPMiddleware):
        async def dispatch(self, request, call_next):  # type: ignore[no-untyped-def]
            return JSONResponse({"middleware": request.url.path}, status_code=418)

    app = create_app(ProxySettings(decode=(parse_worker_spec("decode", "127.0.0.1:9"),)))
    app.add_middleware(Refuse)

    async def call() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://proxy") as client:
            return [
                await client.post(path, json=completion())
                for path in ("/v1/completions", "/v1/chat/completions")
            ]

    for resp in asyncio.run(call()):
        assert resp.status_code == 418 and resp.json()["middleware"].startswith("/v1/")
