"""The proxy-side facade: tokenizer + index + subscriber + policy, fed by a real publisher."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest

from lmcache_disagg.errors import ConfigError
from lmcache_disagg.keys import chain_root, chunk_keys
from lmcache_disagg.proxy.cache_aware import CacheAwareSettings
from lmcache_disagg.proxy.kvevents import EventSource
from lmcache_disagg.proxy.kvrouting import (
    KVRouting,
    KVRoutingSettings,
    event_sources,
    parse_event_source,
    reported_cached_tokens,
    tokenizer_dir_from_models,
)
from lmcache_disagg.proxy.kvsync import SyncState
from lmcache_disagg.proxy.settings import parse_worker_spec
from lmcache_disagg.proxy.sharedstate import SharedWorkerList
from lmcache_disagg.proxy.workers import WorkerPool
from lmcache_disagg.transfer.event_publisher import KVEventPublisher, PublisherSettings
from lmcache_disagg.transfer.protocol import LayoutFingerprint

FP = LayoutFingerprint(
    model="tiny", dtype="float32", num_layers=2, num_kv_heads=2, head_dim=32, chunk_size=8,
    tp_rank=0, tp_size=1,
)  # fmt: skip


def test_parse_event_source() -> None:
    assert parse_event_source("h:8200=tcp://h:5557") == EventSource(
        "h:8200", "tcp://h:5557", "tcp://h:5558"
    )
    spec = parse_event_source("h:8200=tcp://h:5557,snapshot=tcp://h:6000")
    assert spec.snapshot_endpoint == "tcp://h:6000"
    for bad in ("h:8200", "=tcp://h:1", "h=http://h:1", "h=tcp://h", "h=tcp://h:1,x=tcp://h:2"):
        with pytest.raises(ConfigError):
            parse_event_source(bad)


def test_missing_tokenizer_dir_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="tokenizer"):
        KVRouting(KVRoutingSettings(str(tmp_path / "nope"), ()))


def test_routes_a_chat_to_the_worker_holding_its_prefix(tiny_model_dir: Path) -> None:
    pubs = {
        name: KVEventPublisher(
            PublisherSettings("tcp://127.0.0.1:0", heartbeat_interval=0.1), FP, publisher_id=name
        ).start()
        for name in ("d0", "d1")
    }
    sources = tuple(EventSource(n, p.endpoint, p.snapshot_endpoint) for n, p in pubs.items())
    routing = KVRouting(
        KVRoutingSettings(str(tiny_model_dir), sources, CacheAwareSettings(skip_prefill_chunks=1))
    ).start()
    try:
        body = {"messages": [{"role": "system", "content": "Be brief. " * 20},
                             {"role": "user", "content": "Name a river in France."}]}  # fmt: skip
        ids = routing.tokens(body)
        assert ids is not None and len(ids) > 3 * FP.chunk_size
        keys = chunk_keys(chain_root(FP), ids, FP.chunk_size)
        pubs["d1"].stored(keys, "l1")  # d1 served this conversation before
        pubs["d0"].stored(keys[:1], "l1")
        deadline = time.monotonic() + 10
        while routing.policy.cached_tokens("d1", ids) < len(ids) and time.monotonic() < deadline:
            time.sleep(0.01)
        choice = routing.choose(ids, [("d0", 0), ("d1", 0)])
        assert choice is not None and choice.name == "d1" and choice.cached_tokens == len(ids)
        assert routing.skip_prefill(ids, choice), "D holds it all: P is skipped"
        routing.observe(choice.cached_tokens, len(ids) - 5)
        assert routing.tokens({"prompt": ["a", "b"]}) is None
        stats = routing.stats()
        assert stats.sources == {"d0": SyncState.SYNCED, "d1": SyncState.SYNCED}
        assert stats.index_keys == len(keys) and stats.resyncs >= 2  # first contact: snapshots
        assert stats.decisions == {"cached_on_decode": 1} and stats.untokenized_requests == 1
        assert (stats.predicted_hit_tokens, stats.actual_hit_tokens) == (len(ids), len(ids) - 5)
    finally:
        routing.close()
        for pub in pubs.values():
            pub.close()


def test_event_sources_auto_and_explicit() -> None:
    workers = ["10.0.0.1:8100", "10.0.0.2:8200"]
    auto = event_sources(["auto"], workers)
    assert [s.endpoint for s in auto] == ["tcp://10.0.0.1:17570", "tcp://10.0.0.2:17570"]
    assert auto[0].snapshot_endpoint == "tcp://10.0.0.1:17571"
    mixed = event_sources(["auto:6000", "10.0.0.2:8200=tcp://10.0.0.9:7000"], workers)
    assert [s.endpoint for s in mixed] == ["tcp://10.0.0.1:6000", "tcp://10.0.0.9:7000"]
    for bad in (["auto:x"], ["auto:0"], ["10.0.0.3:1=tcp://h:1"]):
        with pytest.raises(ConfigError):
            event_sources(bad, workers)


def test_workers_added_at_run_time_get_an_event_source(tmp_path: Path) -> None:
    explicit = parse_event_source("10.0.0.1:8100=tcp://10.0.0.1:7000")
    for auto_port, expected in ((6000, "tcp://10.0.0.3:6000"), (None, None)):
        routing = KVRouting(KVRoutingSettings(None, (explicit,), auto_events_port=auto_port))
        assert routing.event_source("10.0.0.1:8100") == explicit, "the start-up source is kept"
        new = routing.event_source("10.0.0.3:8300")
        assert (new.endpoint if new else None) == expected
        given = routing.event_source("10.0.0.3:8300", "tcp://10.0.0.4:9000,snapshot=tcp://h:9")
        assert given is not None and given.snapshot_endpoint == "tcp://h:9"
        with pytest.raises(ConfigError, match="kv_events 'udp://x': expected tcp://"):
            routing.event_source("10.0.0.3:8300", "udp://x")
        routing.follow([("10.0.0.1:8100", None), ("10.0.0.3:8300", "tcp://10.0.0.4:9000")])
        followed = {s.worker: s.endpoint for s in routing.subscriber.sources()}
        assert followed == {"10.0.0.1:8100": "tcp://10.0.0.1:7000",
                            "10.0.0.3:8300": "tcp://10.0.0.4:9000"}  # fmt: skip
        routing.follow([("10.0.0.3:8300", "tcp://10.0.0.4:9000")])
        assert [s.worker for s in routing.subscriber.sources()] == ["10.0.0.3:8300"]
    # The shared worker list of a --workers N proxy carries each worker's kv_events.
    pool, other = WorkerPool(3, 1.0), WorkerPool(3, 1.0)
    spec = parse_worker_spec("decode", "10.0.0.3:8300")
    pool.add(dataclasses.replace(spec, events="tcp://10.0.0.4:9000"))
    SharedWorkerList(tmp_path / "state.json", pool).save()
    (loaded,) = SharedWorkerList(tmp_path / "state.json", other).load()
    assert loaded.events == "tcp://10.0.0.4:9000" and loaded.http == "10.0.0.3:8300"


def test_usage_and_model_discovery_helpers(tiny_model_dir: Path) -> None:
    answer = b'{"usage": {"prompt_tokens": 9, "prompt_tokens_details": {"cached_tokens": 4}}}'
    assert reported_cached_tokens(answer) == 4
    for other in (b"not json", b"[]", b'{"usage": {"prompt_tokens_details": null}}',
                  b'{"usage": {"prompt_tokens_details": {"cached_tokens": true}}}'):  # fmt: skip
        assert reported_cached_tokens(other) is None
    models = {"data": [{"id": "served-name", "root": str(tiny_model_dir)}]}
    assert tokenizer_dir_from_models(models) == str(tiny_model_dir)
    assert tokenizer_dir_from_models({"data": [{"id": "hub/model"}]}) is None
    assert tokenizer_dir_from_models("junk") is None
