"""Network address helpers shared by the packages (torch-free): loopback checks.

``host:port`` parsing lives in :func:`lmcache_disagg.config.split_host_port` (config validation
uses it too); this module holds what has no config meaning.
"""

from __future__ import annotations

import ipaddress

__all__ = ["is_loopback"]


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IPv4/IPv6 literals (brackets allowed)."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
