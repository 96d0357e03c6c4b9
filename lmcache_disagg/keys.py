"""Content keys of KV chunks: a seedless hash chain over token ids (torch-free; the proxy and the
connector both import it).

``key_i = H(key_{i-1} || n_i || token_bytes(chunk_i))`` with ``H`` = xxh3-128, where ``key_{-1}``
is a hash of the canonical encoding of the :class:`LayoutFingerprint` (model, dtype, layer count,
KV heads, head dim, chunk size, TP rank and size, KV layout). ``n_i`` is the chunk's token count,
so a partial last chunk never collides with a full one; ``token_bytes`` are the ids as little-endian
int64. Nothing here depends on PYTHONHASHSEED, the process or the host: two workers that serve the
same model in the same layout compute the same keys for the same tokens.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import msgspec
import xxhash

__all__ = ["KEY_BYTES", "KEY_SCHEME", "chain_root", "chunk_keys", "chunk_spans"]

KEY_SCHEME = b"lmcache-disagg/chunk-key/v1"
KEY_BYTES = 16
_COUNT = struct.Struct("<Q")


def chain_root(fingerprint: msgspec.Struct) -> bytes:
    """``key_{-1}``: the hash of the scheme tag and the fingerprint's canonical msgpack form.

    msgspec encodes struct fields in declaration order with deterministic values, so the root is a
    pure function of the fingerprint's field values.
    """
    encoded = msgspec.msgpack.encode(fingerprint)
    return xxhash.xxh3_128_digest(KEY_SCHEME + _COUNT.pack(len(encoded)) + encoded)


def chunk_spans(num_tokens: int, chunk_size: int) -> list[tuple[int, int]]:
    """``[start, end)`` token ranges of the chunks that cover ``num_tokens`` tokens."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if num_tokens < 0:
        raise ValueError(f"num_tokens must not be negative, got {num_tokens}")
    return [(s, min(s + chunk_size, num_tokens)) for s in range(0, num_tokens, chunk_size)]


def chunk_keys(
    root: bytes, token_ids: Sequence[int], chunk_size: int, num_tokens: int | None = None
) -> list[bytes]:
    """Keys of the chunks covering the first ``num_tokens`` (default: all) of ``token_ids``.

    The last key covers a partial chunk when ``num_tokens`` is not a multiple of ``chunk_size``.
    Raises ValueError when ``num_tokens`` exceeds the tokens given or a token id is not a valid
    int64.
    """
    count = len(token_ids) if num_tokens is None else num_tokens
    if count > len(token_ids):
        raise ValueError(f"{count} tokens requested, only {len(token_ids)} given")
    keys: list[bytes] = []
    prev = root
    for start, end in chunk_spans(count, chunk_size):
        n = end - start
        try:
            body = struct.pack(f"<{n}q", *token_ids[start:end])
        except struct.error as exc:
            raise ValueError(f"token ids {start}..{end} are not int64 values: {exc}") from exc
        prev = xxhash.xxh3_128_digest(prev + _COUNT.pack(n) + body)
        keys.append(prev)
    return keys
