"""The root of every exception lmcache-disagg raises.

Each subpackage hangs its own tree under :class:`LMCacheDisaggError`::

    LMCacheDisaggError
    ├── ConfigError                  bad YAML / env / extra-config value (names the key)
    ├── lmcache_disagg.transfer.errors.TransferError ...
    ├── lmcache_disagg.proxy.errors.ProxyError ...
    └── lmcache_disagg.connector.errors.ConnectorError ...

Lower-layer errors (aiohttp, zmq, NIXL, OS) are translated at the boundary and chained with
``raise ... from exc`` so the original cause stays visible.
"""

from __future__ import annotations

__all__ = ["ConfigError", "LMCacheDisaggError"]


class LMCacheDisaggError(Exception):
    """Base class of every error raised by lmcache-disagg."""


class ConfigError(LMCacheDisaggError, ValueError):
    """A configuration value is missing, unknown or invalid. The message names the key."""
