"""D's reservations: one per transfer, owning its pool pages, its TTL and its slots' states.

The receive pool only hands out and takes back pages; everything a transfer knows about its pages
lives in its :class:`Reservation`. The receiver mutates reservations under its own lock.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from lmcache_disagg.transfer.session import Session
from lmcache_disagg.transfer.state import RecvState

__all__ = ["ChunkMeta", "ChunkTarget", "Reservation", "SlotState"]


class SlotState(enum.Enum):
    EMPTY = "EMPTY"
    WRITING = "WRITING"
    """A channel is writing the chunk's bytes into the slot's page."""
    VERIFIED = "VERIFIED"
    """The chunk arrived and its checksum matched."""


@dataclass(frozen=True, slots=True)
class ChunkMeta:
    nbytes: int
    num_tokens: int
    key: bytes


@dataclass(eq=False)
class Reservation:
    """``pages[i]`` holds chunk ``i``; the pages return to the pool once the reservation ended
    and no channel writes into them any more (``writers`` == 0)."""

    transfer_id: str
    handle: int
    session: Session
    pages: list[int]
    expires: float
    slots: list[SlotState] = field(init=False)
    meta: list[ChunkMeta | None] = field(init=False)
    expected: int | None = None
    received: int = 0
    state: RecvState = RecvState.RECEIVING
    reason: str = ""
    writers: int = 0
    ended: bool = False
    held: int = 0
    """Slots ``[0, held)`` are chunks D already held (pinned by the receiver's HeldChunks)."""
    waiters: list[tuple[bytes, int]] = field(default_factory=list)
    """(zmq identity, rid) of Finish requests answered once the transfer resolves."""

    def __post_init__(self) -> None:
        self.slots = [SlotState.EMPTY] * len(self.pages)
        self.meta = [None] * len(self.pages)

    @property
    def n_expected(self) -> int:
        return self.expected if self.expected is not None else len(self.pages)

    def extend(self, ttl: float) -> None:
        """Restart the TTL at ``ttl`` seconds from now."""
        self.expires = time.monotonic() + ttl

    def all_verified(self) -> bool:
        n = self.n_expected
        return self.received >= n and all(s is SlotState.VERIFIED for s in self.slots[:n])

    @property
    def releasable(self) -> bool:
        return self.ended and self.writers == 0


@dataclass(frozen=True, slots=True, eq=False)
class ChunkTarget:
    """Where a channel writes one chunk: ``page`` (a pool page index) of ``reservation``."""

    reservation: Reservation
    slot: int
    page: int
