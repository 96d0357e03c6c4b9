"""Client API key, worker key, admin key on /workers, and keys never logged."""

from __future__ import annotations

import httpx

from lmcache_disagg import kv_params
from tests.proxy.utils import Cluster, completion, wait_for

API_KEY = "sk-client-Zq81"
ADMIN_KEY = "adm-Kk72-secret"
WORKER_KEY = "wk-Pp55-secret"


def test_client_api_key(cluster: Cluster) -> None:
    proxy = cluster.proxy(env={"LMCACHE_PROXY_API_KEY": API_KEY})
    url = proxy.url + "/v1/completions"
    assert httpx.post(url, json=completion(), timeout=5).status_code == 401
    bad = httpx.post(url, json=completion(), headers={"Authorization": "Bearer nope"}, timeout=5)
    assert bad.status_code == 401 and bad.json()["error"]["type"] == "authentication_error"
    ok = httpx.post(
        url, json=completion(), headers={"Authorization": f"Bearer {API_KEY}"}, timeout=5
    )
    assert ok.status_code == 200
    assert httpx.get(proxy.url + "/v1/models", timeout=5).status_code == 401
    # Liveness, readiness and metrics stay open for orchestrators.
    for path in ("/health", "/ready", "/metrics"):
        assert httpx.get(proxy.url + path, timeout=5).status_code == 200
    # The client's key is not forwarded to workers.
    assert cluster["p0"].requests()[-1]["authorization"] is None


def test_worker_key_forwarded_to_both_legs(cluster: Cluster) -> None:
    proxy = cluster.proxy(extra=["--worker-key", WORKER_KEY])
    assert proxy.post("/v1/completions", completion()).status_code == 200
    assert cluster["p0"].requests()[-1]["authorization"] == f"Bearer {WORKER_KEY}"
    assert cluster["d0"].requests()[-1]["authorization"] == f"Bearer {WORKER_KEY}"


def test_workers_endpoint_requires_admin_key(cluster: Cluster) -> None:
    no_admin = cluster.proxy()
    assert httpx.get(no_admin.url + "/workers", timeout=5).status_code == 403
    proxy = cluster.proxy(env={"LMCACHE_PROXY_ADMIN_KEY": ADMIN_KEY})
    url = proxy.url + "/workers"
    auth = {"Authorization": f"Bearer {ADMIN_KEY}"}
    assert httpx.get(url, timeout=5).status_code == 401
    assert httpx.get(url, headers={"Authorization": "Bearer x"}, timeout=5).status_code == 401
    listed = httpx.get(url, headers=auth, timeout=5).json()["workers"]
    assert {(w["role"], w["http"]) for w in listed} == {
        ("prefill", cluster["p0"].addr), ("decode", cluster["d0"].addr)
    }  # fmt: skip
    # Add d1 with an explicit KV endpoint; it gets traffic once healthy.
    add = httpx.post(url, headers=auth, timeout=5,
                     json={"role": "decode", "http": cluster["d1"].addr, "kv": "127.0.0.1:17123"})  # fmt: skip
    assert add.status_code == 200
    assert httpx.post(url, json={"role": "decode", "http": "x"}, timeout=5).status_code == 401
    assert httpx.post(url, headers=auth, json={"role": "bogus"}, timeout=5).status_code == 400
    assert httpx.post(url, headers=auth, json={"role": "decode", "http": "nohost"},
                      timeout=5).status_code == 400  # fmt: skip

    def d1_used() -> bool:
        proxy.post("/v1/completions", completion())
        return bool(cluster["d1"].requests())

    assert wait_for(d1_used, timeout=5)
    targets = {r["body"][kv_params.KV_TRANSFER_PARAMS][kv_params.PUSH_TARGET]
               for r in cluster["p0"].requests()}  # fmt: skip
    assert "127.0.0.1:17123" in targets
    # Remove d0: all traffic moves to d1.
    rm = httpx.request("DELETE", url, headers=auth, json={"role": "decode", "http": cluster["d0"].addr},
                       timeout=5)  # fmt: skip
    assert rm.status_code == 200
    before = len(cluster["d0"].requests())
    for _ in range(4):
        assert proxy.post("/v1/completions", completion()).status_code == 200
    assert len(cluster["d0"].requests()) == before
    assert httpx.request("DELETE", url, headers=auth, timeout=5,
                         json={"role": "decode", "http": cluster["d0"].addr}).status_code == 404  # fmt: skip


def test_keys_never_appear_in_logs(cluster: Cluster) -> None:
    proxy = cluster.proxy(
        prefill=["p0", "p1"],
        extra=["--prefill-timeout", "0.5"],
        env={
            "LMCACHE_PROXY_API_KEY": API_KEY,
            "LMCACHE_PROXY_ADMIN_KEY": ADMIN_KEY,
            "LMCACHE_PROXY_WORKER_KEY": WORKER_KEY,
        },
    )
    good = {"Authorization": f"Bearer {API_KEY}"}
    cluster["p0"].set("500")
    for _ in range(3):
        proxy.post("/v1/completions", completion(), headers=good)
        proxy.post("/v1/completions", completion(kv_transfer_params={"x": 1}), headers=good)
        proxy.post(
            "/v1/completions", completion(), headers={"Authorization": f"Bearer {ADMIN_KEY}"}
        )
        proxy.post("/v1/completions", b"{bad", headers=good)
        httpx.get(proxy.url + "/workers", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=5)
    cluster["d0"].set("die")
    proxy.post("/v1/completions", completion(stream=True), headers=good)
    proxy.proc.stop()
    log = proxy.log_text()
    assert "lmcache_disagg.proxy.access" in log  # the log was really captured ...
    for key in (API_KEY, ADMIN_KEY, WORKER_KEY):
        assert key not in log  # ... and no key is in it
