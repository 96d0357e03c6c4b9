"""Value types the connector reads back from the transfer layer (no torch import at runtime)."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["PushState", "PushStatus", "ReceivedChunk", "RecvState", "TransferState"]


class RecvState(enum.Enum):
    UNKNOWN = "UNKNOWN"
    """No such transfer (never reserved, already released, or expired)."""
    RECEIVING = "RECEIVING"
    COMPLETE = "COMPLETE"
    FAILED = "FAILED"


@dataclass(frozen=True)
class TransferState:
    """Snapshot returned by :meth:`KVReceiver.poll`. ``reason`` is set when FAILED."""

    state: RecvState
    chunks_received: int = 0
    chunks_expected: int = 0
    reason: str = ""


@dataclass(frozen=True)
class ReceivedChunk:
    """One verified chunk. ``data`` is a uint8 view of the pool page's first ``nbytes`` bytes.

    The view aliases the receive pool: it is valid until :meth:`KVReceiver.release` is called for the
    transfer (or its TTL passes), so copy/scatter it before releasing.

    ``held``: D already held this chunk when P reserved (P did not push it); ``data`` is then
    NOT the chunk: the caller reads it from its own store (the receiver's :class:`HeldChunks`).
    """

    index: int
    num_tokens: int
    key: bytes
    data: torch.Tensor
    held: bool = False


class PushState(enum.Enum):
    PENDING = "PENDING"
    DONE = "DONE"
    """D acknowledged every chunk (all arrived and verified)."""
    FAILED = "FAILED"


@dataclass(frozen=True)
class PushStatus:
    state: PushState
    reason: str = ""
