"""``data_port`` / ``advertised_data_port``: D binds a known data port and announces another one.

This is what puts a fault proxy (or a NAT / port forward) on the real P->D data path: a real
sender that handshakes with the receiver connects to the ADVERTISED port, so a push only completes
when something there forwards to the bound port.
"""

from __future__ import annotations

import socket

import pytest

from lmcache_disagg.config import load_config
from lmcache_disagg.errors import ConfigError
from lmcache_disagg.transfer.errors import TransferError
from lmcache_disagg.transfer.receiver import KVReceiver
from lmcache_disagg.transfer.sender import KVSender
from lmcache_disagg.transfer.state import PushState, RecvState
from lmcache_disagg.vllm_server import free_port
from tests.transfer.faultproxy import ArmedFaultProxy
from tests.transfer.utils import FP, chunk_data, make_config


def test_defaults_and_overrides() -> None:
    default = load_config(environ={})
    assert (default.data_port, default.advertised_data_port) == (0, None)
    got = load_config(overrides={"data_port": 18001, "advertised_data_port": 18002}, environ={})
    assert (got.data_port, got.advertised_data_port) == (18001, 18002)
    env = load_config(environ={"LMCACHE_DATA_PORT": "18003", "LMCACHE_ADVERTISED_DATA_PORT": "9"})
    assert (env.data_port, env.advertised_data_port) == (18003, 9)


@pytest.mark.parametrize(
    ("key", "value"), [("data_port", -1), ("data_port", 70000), ("advertised_data_port", 0)]
)
def test_bad_ports_are_refused(key: str, value: int) -> None:
    with pytest.raises(ConfigError, match=key):
        load_config(overrides={key: value}, environ={})


def _push(tx: KVSender, endpoint: str, tid: str) -> PushState:
    handle = tx.open(endpoint, tid, 1)
    page = tx.acquire_page(2.0)
    page.data.copy_(chunk_data(3, 0, FP.page_bytes))
    handle.write(0, page, FP.page_bytes, FP.chunk_size, b"k0")
    handle.finish()
    return handle.wait(6.0).state


def test_receiver_binds_data_port_and_announces_the_advertised_one() -> None:
    data_port, advertised = free_port(), free_port()
    rx = KVReceiver(make_config("tcp", data_port=data_port, advertised_data_port=advertised), FP)
    rx.start()
    tx = KVSender(make_config("tcp", push_deadline=2.0), FP)
    tx.start()
    relay: ArmedFaultProxy | None = None
    try:
        assert rx.data_port == data_port
        # Nothing listens on the advertised port yet: the sender cannot reach the data path.
        with pytest.raises(TransferError):
            _push(tx, rx.endpoint, "unreachable")
        # A relay on the advertised port forwarding to the bound one makes the push work.
        relay = ArmedFaultProxy(data_port, listen_port=advertised)
        assert _push(tx, rx.endpoint, "relayed") is PushState.DONE
        assert rx.poll("relayed").state is RecvState.COMPLETE
        assert relay.frames_seen == 1
        rx.release("relayed")
        assert rx.occupancy() == 0
    finally:
        tx.shutdown()
        if relay is not None:
            relay.close()
        rx.shutdown()


def test_busy_data_port_is_a_clear_start_error() -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        rx = KVReceiver(make_config("tcp", data_port=port), FP)
        with pytest.raises(TransferError, match=f"data listener on 127.0.0.1:{port}"):
            rx.start()
        rx.shutdown()
