"""The KV-path part of a decode worker's health: does D's KV listener answer the handshake?

Opt-in (``--kv-probe``). Uses :func:`lmcache_disagg.transfer.probe.probe` (torch- and NIXL-free,
imported only when the probe is enabled), which blocks for up to its timeout, so it runs on this
object's own small named thread pool. With a cluster secret the handshake is authenticated both
ways, so a D that would refuse P's pushes is not reported ready.

Called by the health checker (event loop) once per decode worker per health interval.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

from lmcache_disagg.proxy.metrics import ProxyMetrics

__all__ = ["KVPathProber"]

_log = logging.getLogger("lmcache_disagg.proxy")


class KVPathProber:
    """Probes KV endpoints; ``shutdown()`` joins its threads."""

    def __init__(self, timeout: float, cluster_secret: str | None, metrics: ProxyMetrics) -> None:
        from lmcache_disagg.transfer.probe import probe

        self._probe = probe
        self._timeout = timeout
        self._secret = cluster_secret
        self._metrics = metrics
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="lmcache-proxy-kvprobe")
        self._last_error: dict[str, str] = {}

    async def check(self, endpoint: str) -> bool:
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(
            self._pool, self._probe, endpoint, self._timeout, self._secret
        )
        if result.ok:
            self._last_error.pop(endpoint, None)
            return True
        self._metrics.kv_probe_failures.labels(endpoint, result.error or "unknown").inc()
        if self._last_error.get(endpoint) != result.error:
            # Log on change only; the detail never contains the secret.
            _log.warning("KV probe of %s failed: %s (%s)", endpoint, result.error, result.detail)
            self._last_error[endpoint] = result.error
        return False

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
