"""Exceptions of :mod:`lmcache_disagg.connector` (torch-free).

The connector never lets one of these escape into vLLM's engine loop for a single request's
failure: a failed push or load is counted, logged once and turned into a recompute. They are raised
at set-up (bad config, unsupported KV layout) and by the small parsing helpers::

    LMCacheDisaggError
    └── ConnectorError
        ├── ParamsError          a kv_transfer_params field is missing, of the wrong type or out of range
        ├── UnsupportedLayout    vLLM's KV cache is not a layout the kernels can gather/scatter
        └── KeyMismatch          a received chunk's key differs from the one D computed itself
"""

from __future__ import annotations

from lmcache_disagg.errors import LMCacheDisaggError

__all__ = ["ConnectorError", "KeyMismatch", "ParamsError", "UnsupportedLayout"]


class ConnectorError(LMCacheDisaggError):
    """Base of every connector error."""


class ParamsError(ConnectorError, ValueError):
    """``kv_transfer_params`` from the proxy or from P is malformed (the message names the field)."""


class UnsupportedLayout(ConnectorError):
    """The worker's KV cache layout cannot be gathered/scattered; the connector stays inactive."""


class KeyMismatch(ConnectorError):
    """A received chunk does not carry the key D computed from its own prompt tokens."""
