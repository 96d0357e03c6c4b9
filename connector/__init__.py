"""lmcache-disagg's vLLM KV connector (push model): P pushes prompt KV chunks into D while it
prefills; D loads them instead of recomputing the prompt.

vLLM loads it with ``{"kv_connector": "LMCacheDisaggConnector",
"kv_connector_module_path": "lmcache_disagg.connector", ...}``. This is the only subpackage that
imports vLLM; the name below resolves lazily so that the torch-free helpers (:mod:`.keys`,
:mod:`.params`) import without vLLM.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lmcache_disagg.connector.connector import LMCacheDisaggConnector

__all__ = ["LMCacheDisaggConnector"]


def __getattr__(name: str) -> Any:
    if name == "LMCacheDisaggConnector":
        value = importlib.import_module(f"{__name__}.connector").LMCacheDisaggConnector
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
