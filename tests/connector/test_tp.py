"""TP > 1 with equal TP on both sides: rank i pushes to D rank i (port + i), keys carry the rank."""

from __future__ import annotations

import logging
import socket
import time

import pytest
import torch

from lmcache_disagg.connector.device import SyncCopyEngine
from lmcache_disagg.connector.errors import UnsupportedLayout
from lmcache_disagg.connector.kvcache import (
    describe_kv_caches,
    listen_port_for_rank,
    receiver_config_for_rank,
    target_for_rank,
)
from lmcache_disagg.connector.loader import Loader
from lmcache_disagg.connector.logonce import LogOnce
from lmcache_disagg.connector.metadata import (
    LMCacheDisaggMetadata,
    LoadSpec,
    PushProgress,
    PushStart,
)
from lmcache_disagg.connector.pusher import Pusher
from lmcache_disagg.connector.stats import StatsRecorder
from lmcache_disagg.transfer import KVReceiver, KVSender
from tests.connector.test_push_load import D_BLOCKS, P_BLOCKS, PROMPT, config
from tests.connector.utils import keys_for, make_kv, token_values

LOG = LogOnce(logging.getLogger("test"))


def test_rank_mapping() -> None:
    assert target_for_rank("10.0.0.2:17555", 0) == "10.0.0.2:17555"
    assert target_for_rank("10.0.0.2:17555", 3) == "10.0.0.2:17558"
    assert target_for_rank("[::1]:17555", 1) == "[::1]:17556"
    assert listen_port_for_rank(17555, 2) == 17557
    assert listen_port_for_rank(0, 2) == 0
    with pytest.raises(ValueError):
        target_for_rank("h:65535", 1)
    with pytest.raises(ValueError):
        listen_port_for_rank(65535, 1)


def test_every_fixed_d_port_is_offset_by_the_rank() -> None:
    fixed = config(listen_port=17555, data_port=18000, advertised_data_port=19000)
    rank2 = receiver_config_for_rank(fixed, 2)
    assert (rank2.listen_port, rank2.data_port, rank2.advertised_data_port) == (17557, 18002, 19002)
    assert receiver_config_for_rank(fixed, 0) == fixed
    ephemeral = receiver_config_for_rank(config(listen_port=0), 3)
    assert (ephemeral.listen_port, ephemeral.data_port, ephemeral.advertised_data_port) == (
        0,
        0,
        None,
    )
    assert ephemeral.pool_size == fixed.pool_size  # nothing else changes


def test_two_ranks_with_fixed_ports_bind_side_by_side() -> None:
    """Both ranks of one host start from the same config with fixed control and data ports."""
    base, data = _two_free_ports(), _two_free_ports()
    shared = config(listen_port=base, data_port=data, channel="tcp")
    kv = [make_kv(tp_rank=r) for r in (0, 1)]
    receivers = [KVReceiver(receiver_config_for_rank(shared, r), kv[r].fingerprint) for r in (0, 1)]
    try:
        for rx in receivers:
            rx.start()
        assert [rx.endpoint for rx in receivers] == [f"127.0.0.1:{base}", f"127.0.0.1:{base + 1}"]
        assert [rx.data_port for rx in receivers] == [data, data + 1]
    finally:
        for rx in receivers:
            rx.shutdown()


def test_keys_carry_the_rank() -> None:
    rank0, rank1 = make_kv(tp_rank=0), make_kv(tp_rank=1)
    assert keys_for(rank0, PROMPT) != keys_for(rank1, PROMPT)
    assert keys_for(rank1, PROMPT) == keys_for(make_kv(tp_rank=1, seed=9), PROMPT)


def test_describe_orders_layers_by_index_and_fingerprints_the_rank() -> None:
    kv = make_kv(num_layers=3)
    caches = {
        "model.layers.10.self_attn.attn": kv.caches[2],
        "model.layers.2.self_attn.attn": kv.caches[1],
        "model.layers.0.self_attn.attn": kv.caches[0],
    }
    described = describe_kv_caches(
        caches, model="m", chunk_size=16, tp_rank=1, tp_size=2, use_mla=False
    )
    assert [c.data_ptr() for c in described.caches] == [c.data_ptr() for c in kv.caches]
    fp = described.fingerprint
    assert (fp.num_layers, fp.num_kv_heads, fp.head_dim, fp.tp_rank, fp.tp_size) == (3, 2, 8, 1, 2)
    assert described.layout.kind == "cpu"
    with pytest.raises(UnsupportedLayout):
        describe_kv_caches(
            {"a.0.x": torch.zeros(4, 4)}, model="m", chunk_size=16, tp_rank=0, tp_size=1,
            use_mla=False,
        )  # fmt: skip


def _two_free_ports() -> int:
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            base = a.getsockname()[1]
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", base + 1))
                except OSError:
                    continue
                return int(base)
    raise RuntimeError("no two consecutive free ports")


def test_two_ranks_push_to_their_peer_rank() -> None:
    base = _two_free_ports()
    cfg = config(listen_port=base)
    p_kv = [make_kv(tp_rank=r, seed=10 + r) for r in (0, 1)]
    d_kv = [make_kv(tp_rank=r, seed=20 + r) for r in (0, 1)]
    receivers, senders, pushers, loaders = [], [], [], []
    try:
        for rank in (0, 1):
            rx = KVReceiver(receiver_config_for_rank(cfg, rank), d_kv[rank].fingerprint)
            rx.start()
            receivers.append(rx)
            loaders.append(Loader(cfg, d_kv[rank], rx, SyncCopyEngine(), StatsRecorder(), LOG))
            tx = KVSender(cfg, p_kv[rank].fingerprint)
            tx.start()
            senders.append(tx)
            pusher = Pusher(cfg, p_kv[rank], tx, SyncCopyEngine(), StatsRecorder(), LOG)
            pusher.start()
            pushers.append(pusher)
        # The SAME metadata goes to both ranks (as vLLM does); each maps it to its own peer.
        meta = LMCacheDisaggMetadata(
            push_starts=[PushStart("r", "tid", f"127.0.0.1:{base}", PROMPT[:-1])],
            push_progress=[PushProgress("r", P_BLOCKS, len(PROMPT))],
            push_finished=["r"],
        )
        for pusher in pushers:
            pusher.on_metadata(meta)
        spec = LoadSpec("r", "tid", D_BLOCKS, 0, 69, 69, PROMPT[:69])
        for loader in loaders:
            loader.on_metadata(LMCacheDisaggMetadata(loads=[spec]))
        done = [set(), set()]  # type: list[set[str]]
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not all(done):
            for rank in (0, 1):
                pushers[rank].after_forward()
                pushers[rank].take_finished()
                finished, failed = loaders[rank].poll(set())
                assert not failed
                done[rank] |= finished
            time.sleep(0.005)
        assert done == [{"r"}, {"r"}]
        for rank in (0, 1):
            got = token_values(d_kv[rank], D_BLOCKS, 0, 69)
            assert got.equal(token_values(p_kv[rank], P_BLOCKS, 0, 69))
            assert receivers[rank].occupancy() == 0
        assert not token_values(d_kv[0], D_BLOCKS, 0, 69).equal(
            token_values(d_kv[1], D_BLOCKS, 0, 69)
        )
    finally:
        for pusher in pushers:
            pusher.shutdown()
        for tx in senders:
            tx.shutdown()
        for loader in loaders:
            loader.shutdown()
        for rx in receivers:
            rx.shutdown()
