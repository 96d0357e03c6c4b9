"""Value types of the chunk store: tiers and lookup results."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

__all__ = ["Hit", "HitChunk", "Tier"]


class Tier(enum.Enum):
    """Where a chunk lives. Lookups walk them in this order."""

    L1 = "l1"  # CPU RAM
    L2 = "l2"  # local disk
    L3 = "l3"  # Redis / Valkey


@dataclass(frozen=True, slots=True)
class HitChunk:
    """One chunk of a hit: its stored ``key``, the tier it was found in at lookup time, and
    how many of its leading tokens the caller may use (<= the tokens it stores)."""

    key: bytes
    tier: Tier
    num_tokens: int
    stored_tokens: int = 0
    """Tokens the stored chunk holds (its page layout depends on it); >= ``num_tokens``."""


@dataclass(frozen=True, slots=True)
class Hit:
    """The result of :meth:`ChunkStore.lookup`: ``num_tokens`` leading tokens are cached,
    served by ``chunks`` in order (the last one may be used only in part)."""

    num_tokens: int = 0
    chunks: list[HitChunk] = field(default_factory=list)
