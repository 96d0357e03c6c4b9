"""Per-chunk KV checksum log lines, shared by P's pusher and D's loader.

With ``LMCACHE_DISAGG_VERIFY_KV=1`` both sides log one greppable line per chunk, so tests can compare
P's gathered bytes with D's loaded bytes.
"""

from __future__ import annotations

import logging

import torch
import xxhash

__all__ = ["log_checksum"]

logger = logging.getLogger(__name__)


def log_checksum(side: str, transfer_id: str, index: int, data: torch.Tensor) -> None:
    """One greppable line per chunk so tests can compare P's gathered and D's loaded bytes."""
    digest = xxhash.xxh3_64_hexdigest(data.cpu().contiguous().numpy().tobytes())
    logger.info(
        "lmcache-disagg kv-checksum side=%s transfer=%s chunk=%d bytes=%d xxh3=%s",
        side,
        transfer_id,
        index,
        data.numel(),
        digest,
    )
