"""Exceptions raised by :mod:`lmcache_disagg.transfer` (torch-free).

Every failure on the KV path maps to one of these; socket, zmq and NIXL errors are translated at the
boundary with ``raise ... from exc``. The connector treats every :class:`TransferError` the same way
(recompute the missing tokens), but the type and message say *why* for logs and metrics::

    LMCacheDisaggError
    └── TransferError
        ├── PeerUnreachable        no handshake answer / connection refused
        ├── PeerClosed             the peer closed or reset the connection mid-transfer
        ├── FingerprintMismatch    layouts differ; ``.fields`` names the differing fields
        ├── AuthenticationFailed   HMAC challenge failed or one side lacks the cluster secret
        ├── NoRoom                 the receive pool could not reserve the pages before the deadline
        ├── TargetNotAllowed       push target is neither allowlisted nor authenticated
        ├── DuplicateTransfer      the transfer id was already used on that receiver
        ├── ProtocolViolation      a peer sent something malformed or out of bounds
        │   └── UnknownSession     the receiver does not know the session (restarted): handshake again
        └── TransferTimeout
            └── DeadlineExceeded   a wait passed its deadline
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from lmcache_disagg.errors import LMCacheDisaggError

__all__ = [
    "AuthenticationFailed",
    "DeadlineExceeded",
    "DuplicateTransfer",
    "FingerprintMismatch",
    "NoRoom",
    "PeerClosed",
    "PeerUnreachable",
    "ProtocolViolation",
    "TargetNotAllowed",
    "TransferError",
    "TransferTimeout",
    "UnknownSession",
]
# ``__all__`` lists the exception tree only; :func:`error_from_kind` is the one helper.


class TransferError(LMCacheDisaggError):
    """Base of every KV transfer failure. ``reason`` is a short metric label; ``kind`` names the
    class on the wire (``ErrorReply.kind``), so the sender rebuilds the same type."""

    reason = "error"
    kind = "error"

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "kind" not in cls.__dict__:
            cls.kind = cls.reason


class PeerUnreachable(TransferError):
    reason = "unreachable"


class PeerClosed(TransferError):
    reason = "peer_closed"


class FingerprintMismatch(TransferError):
    """The two sides' :class:`~lmcache_disagg.transfer.protocol.LayoutFingerprint` differ."""

    reason = "fingerprint"

    def __init__(self, message: str, fields: list[str] | None = None) -> None:
        super().__init__(message)
        self.fields = list(fields or [])


class AuthenticationFailed(TransferError):
    reason = "auth"


class NoRoom(TransferError):
    reason = "no_room"


class TargetNotAllowed(TransferError):
    reason = "target_not_allowed"


class DuplicateTransfer(TransferError):
    reason = "duplicate"


class ProtocolViolation(TransferError):
    reason = "protocol"


class UnknownSession(ProtocolViolation):
    """Counted as a protocol failure; the sender answers it by handshaking again (once)."""

    kind = "unknown_session"


class TransferTimeout(TransferError):
    reason = "timeout"


class DeadlineExceeded(TransferTimeout):
    reason = "deadline"


_BY_KIND: Mapping[str, type[TransferError]] = MappingProxyType(
    {
        cls.kind: cls
        for cls in (
            AuthenticationFailed,
            DuplicateTransfer,
            FingerprintMismatch,
            NoRoom,
            PeerClosed,
            ProtocolViolation,
            TargetNotAllowed,
            UnknownSession,
        )
    }
)


def error_from_kind(kind: str, message: str, fields: list[str]) -> TransferError:
    """The exception a peer's ``ErrorReply(kind, message, fields)`` stands for."""
    cls = _BY_KIND.get(kind, TransferError)
    if cls is FingerprintMismatch:
        return FingerprintMismatch(message, fields)
    return cls(message)
