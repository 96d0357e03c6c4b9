"""The connector's kv_events_endpoint key: validated, and one endpoint per TP rank."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from lmcache_disagg.config import LMCacheDisaggConfig
from lmcache_disagg.connector.cache import events_endpoint


def test_kv_events_endpoint_key() -> None:
    assert LMCacheDisaggConfig().kv_events_endpoint is None
    cfg = LMCacheDisaggConfig(kv_events_endpoint="tcp://*:17570")
    assert cfg.kv_events_endpoint == "tcp://*:17570"
    for bad in ("ipc:///x", "tcp://host", "tcp://h:99999", "tcp://h:65535"):
        with pytest.raises(ValidationError):
            LMCacheDisaggConfig(kv_events_endpoint=bad)


def test_each_rank_gets_its_own_pub_and_snapshot_ports() -> None:
    assert events_endpoint("tcp://*:17570", 0) == "tcp://*:17570"
    assert events_endpoint("tcp://*:17570", 1) == "tcp://*:17572"
    assert events_endpoint("tcp://127.0.0.1:0", 3) == "tcp://127.0.0.1:0"
