"""Benchmarks and their tooling (``lmcache-disagg bench ...``), kept apart from the product packages.

* :mod:`.transfer` - the KV transfer channel against its raw baseline (plain sockets, bare NIXL).
* :mod:`.kernels`  - gather/scatter bandwidth next to ``copy_``.
* :mod:`.e2e`      - monolithic vLLM vs our PD vs stock NixlConnector behind our proxy.
* :mod:`.proxy`    - the proxy against vllm-router on stub workers (:mod:`.stub_worker`,
  :mod:`.loadgen`), the fault soak and the upstream-client comparison (:mod:`.clients`).
* :mod:`.routing`  - routing policies on a multi-round chat over real HTTP (the proxy's policies,
  vllm-router's ``cache_aware`` and an exact oracle on stub D's with real KV events);
  :mod:`.routing_sim` is the same comparison in virtual time; :mod:`.routing_stats` their figures.
* :mod:`.cache`    - TTFT cold vs warm from each tier of the chunk store, the scatter limit, the
  storing overhead and a multi-round chat with and without the cache.

Each module exposes ``main(argv: list[str]) -> int`` and is imported only when it runs, so
``lmcache-disagg --help`` stays instant. Results and their method are in the README's benchmark
section.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

__all__ = ["BENCH_MODULES"]

BENCH_MODULES: Final[Mapping[str, str]] = MappingProxyType(
    {
        "transfer": "lmcache_disagg.bench.transfer",
        "proxy": "lmcache_disagg.bench.proxy",
        "kernels": "lmcache_disagg.bench.kernels",
        "e2e": "lmcache_disagg.bench.e2e",
        "routing": "lmcache_disagg.bench.routing",
        "cache": "lmcache_disagg.bench.cache",
    }
)
"""Bench target -> module exposing ``main(argv: list[str]) -> int``."""
