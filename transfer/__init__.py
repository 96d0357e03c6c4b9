"""KV transfer layer: push KV chunk pages from P into a reserved receive pool on D.

Channels: NIXL (UCX WRITE + notifications) or a plain TCP channel (checksummed frames read straight
into pool pages); ``channel: auto`` picks NIXL when it imports and the handshake succeeds. The
control plane (zmq + msgspec, :mod:`.protocol`) does one handshake per peer (fingerprint check,
optional mutual HMAC with ``cluster_secret``) and one reservation round trip per transfer.

Usage (D's worker, then P's worker)::

    from lmcache_disagg.config import load_config
    from lmcache_disagg.transfer import KVReceiver, KVSender, LayoutFingerprint, RecvState

    fp = LayoutFingerprint(model="m", dtype="float32", num_layers=2, num_kv_heads=2,
                           head_dim=64, chunk_size=256, tp_rank=0, tp_size=1)
    rx = KVReceiver(load_config(), fp); rx.start()          # D: listens on rx.endpoint
    tx = KVSender(load_config(), fp); tx.start()            # P
    push = tx.open(rx.endpoint, "req-1", n_chunks=2)        # handshake (cached) + reservation
    for i in range(2):
        page = tx.acquire_page(timeout=1.0)
        page.data[:nbytes].copy_(chunk_bytes[i])             # uint8 view of a staging page
        push.write(i, page, nbytes, num_tokens, key=chunk_keys[i])   # returns immediately
    push.finish()                                           # push.status(): PENDING/DONE/FAILED
    # D: rx.poll("req-1").state is RecvState.COMPLETE -> rx.chunks("req-1") -> scatter -> rx.release

Contracts worth knowing:

* ``PushHandle.write`` never blocks on the network (bounded queue; pages return to the sender's pool
  once sent). A failed push drops later writes silently; ``status()``/``wait()`` say why.
  ``KVSender.release_page`` gives back a page you acquired but will not write.
* D completes a transfer when every chunk in ``[0, n)`` arrived and verified (``n`` = reserved, or
  the count ``finish`` announces). Pages stay until ``release`` or ``reservation_ttl`` (restarted at
  COMPLETE); an unfinished reservation is freed at its TTL, so a dead P leaks nothing.
* Transfer ids are single-use per receiver: a second push with the same id is refused
  (DuplicateTransfer); duplicate frames and writes after release are dropped and counted.

Security model: with ``cluster_secret`` set, the handshake is a mutual HMAC-SHA256 challenge over
both nonces and fingerprints; D accepts reservations, data connections and NIXL notifications only
from authenticated sessions, and P pushes only to receivers that prove the secret. Without a secret
P pushes only to ``push_allowlist`` (empty = loopback) and D should listen on loopback (it warns
loudly otherwise). Every TCP frame carries a header checksum (checked before any byte is written)
and a payload checksum (a bad chunk fails its transfer: recompute, never load); every peer-supplied
index, length and count is bounds-checked. Not protected: confidentiality (no encryption) and an
on-path attacker who can read the session id; NIXL/RDMA writes are trusted to the fabric (D cannot
fence a registered pool, so it quarantines the pages of unfinished NIXL transfers after a cancel).

Only :mod:`.protocol`, :mod:`.errors`, :mod:`.probe` and :mod:`.auth` are torch-free; this package
imports nothing heavy eagerly (names below load lazily), so the proxy can import
``lmcache_disagg.transfer.probe.probe`` (not re-exported here: the name is the submodule's).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lmcache_disagg.transfer.errors import (
        AuthenticationFailed,
        DeadlineExceeded,
        DuplicateTransfer,
        FingerprintMismatch,
        NoRoom,
        PeerClosed,
        PeerUnreachable,
        ProtocolViolation,
        TargetNotAllowed,
        TransferError,
        TransferTimeout,
    )
    from lmcache_disagg.transfer.pool import ReceivePool, SendPage
    from lmcache_disagg.transfer.probe import ProbeResult
    from lmcache_disagg.transfer.protocol import PROTOCOL_VERSION, LayoutFingerprint
    from lmcache_disagg.transfer.receiver import KVReceiver
    from lmcache_disagg.transfer.sender import KVSender, PushHandle
    from lmcache_disagg.transfer.state import (
        PushState,
        PushStatus,
        ReceivedChunk,
        RecvState,
        TransferState,
    )

_EXPORTS = {
    "AuthenticationFailed": "errors",
    "DeadlineExceeded": "errors",
    "DuplicateTransfer": "errors",
    "FingerprintMismatch": "errors",
    "NoRoom": "errors",
    "PeerClosed": "errors",
    "PeerUnreachable": "errors",
    "ProtocolViolation": "errors",
    "TargetNotAllowed": "errors",
    "TransferError": "errors",
    "TransferTimeout": "errors",
    "ReceivePool": "pool",
    "SendPage": "pool",
    "ProbeResult": "probe",
    "PROTOCOL_VERSION": "protocol",
    "LayoutFingerprint": "protocol",
    "KVReceiver": "receiver",
    "KVSender": "sender",
    "PushHandle": "sender",
    "PushState": "state",
    "PushStatus": "state",
    "ReceivedChunk": "state",
    "RecvState": "state",
    "TransferState": "state",
}

__all__ = [
    "PROTOCOL_VERSION",
    "AuthenticationFailed",
    "DeadlineExceeded",
    "DuplicateTransfer",
    "FingerprintMismatch",
    "KVReceiver",
    "KVSender",
    "LayoutFingerprint",
    "NoRoom",
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
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
