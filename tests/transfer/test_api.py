"""The public surface: exports, lazy imports, and the torch-free modules the proxy relies on."""

from __future__ import annotations

import subprocess
import sys

import pytest

import lmcache_disagg.transfer as transfer
from lmcache_disagg.errors import LMCacheDisaggError
from lmcache_disagg.transfer import errors
from lmcache_disagg.transfer.probe import probe
from lmcache_disagg.transfer.protocol import LayoutFingerprint
from lmcache_disagg.transfer.receiver import KVReceiver
from tests.transfer.utils import FP, RawPeer, make_config

EXPORTED = {
    "AuthenticationFailed",
    "DeadlineExceeded",
    "DuplicateTransfer",
    "FingerprintMismatch",
    "KVReceiver",
    "KVSender",
    "LayoutFingerprint",
    "NoRoom",
    "PROTOCOL_VERSION",
    "PeerClosed",
    "PeerUnreachable",
    "ProbeResult",
    "ProtocolViolation",
    "PushHandle",
    "PushState",
    "PushStatus",
    "ReceivePool",
    "ReceivedChunk",
    "RecvState",
    "SendPage",
    "TargetNotAllowed",
    "TransferError",
    "TransferState",
    "TransferTimeout",
}


def test_exported_members() -> None:
    assert set(transfer.__all__) == EXPORTED
    for name in EXPORTED:
        assert getattr(transfer, name) is not None


@pytest.mark.parametrize(
    "module",
    [
        "lmcache_disagg.transfer",
        "lmcache_disagg.transfer.protocol",
        "lmcache_disagg.transfer.probe",
        "lmcache_disagg.transfer.errors",
    ],
)
def test_torch_free_imports(module: str) -> None:
    code = (
        f"import sys, {module}; "
        "bad = [m for m in ('torch', 'nixl', 'vllm') if m in sys.modules]; "
        "assert not bad, bad; "
        "import threading; assert threading.active_count() == 1"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_error_tree() -> None:
    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, errors.TransferError) and issubclass(cls, LMCacheDisaggError)
    assert issubclass(errors.DeadlineExceeded, errors.TransferTimeout)


def test_fingerprint_page_bytes_and_diff() -> None:
    assert FP.page_bytes == 2 * 2 * 32 * 2 * 32 * 4
    other = LayoutFingerprint(
        **{**{n: getattr(FP, n) for n in FP.__struct_fields__}, "dtype": "bfloat16", "head_dim": 64}
    )
    assert FP.diff(other) == ["dtype", "head_dim"]
    assert other.page_bytes == FP.page_bytes  # half the itemsize, twice the head_dim


def test_hello_and_probe_floods_do_not_evict_a_working_session() -> None:
    rx = KVReceiver(make_config("tcp", cluster_secret="k"), FP)
    rx.start()
    try:
        good = RawPeer(rx.endpoint, secret="k")
        for _ in range(300):  # more than the half-open limit
            RawPeer(rx.endpoint).close()
        for _ in range(5):
            assert probe(rx.endpoint, 2.0, cluster_secret="k").ok
        reply = good.reserve("still-works", 1)
        assert reply.pages, reply
        rx.release("still-works")
        good.close()
    finally:
        rx.shutdown()
