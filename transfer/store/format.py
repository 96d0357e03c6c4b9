"""The chunk record, as stored in an L2 file and as an L3 value.

Layout (little-endian), then ``n_tokens`` uint32 token ids, then ``payload_len`` KV bytes::

    magic  8s  b"LMCDKV\\x00\\x01"
    version H  RECORD_VERSION
    flags   H  0
    fpdig  16s xxh3-128 of the layout fingerprint (msgpack)
    key    16s the chunk key
    parent 16s the previous chunk's key (or the chain root)
    ntok    I  tokens in the chunk
    plen    Q  payload bytes (ntok * bytes_per_token)
    check  16s xxh3-128 over the header before this field, the token ids and the payload

Readers check the magic, version and fingerprint (``foreign``), the lengths against the record's
size (``truncated`` / ``bad_size``) and the checksum (``checksum``) before any byte is used.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import msgspec
import numpy as np
import xxhash

from lmcache_disagg.transfer.protocol import LayoutFingerprint
from lmcache_disagg.transfer.store.errors import RecordError

__all__ = [
    "HEADER_SIZE",
    "KEY_SIZE",
    "MAGIC",
    "RECORD_VERSION",
    "Record",
    "RecordHeader",
    "decode_header",
    "encode_record",
    "fingerprint_digest",
    "header_tokens",
    "record_size",
    "verify_record",
]

MAGIC = b"LMCDKV\x00\x01"
# History: 1 = first version (issue 13).
RECORD_VERSION = 1
KEY_SIZE = 16
_HEAD = struct.Struct("<8sHH16s16s16sIQ")
_CHECK = struct.Struct("<16s")
HEADER_SIZE = _HEAD.size + _CHECK.size
_TOKEN_BYTES = 4
_MAX_TOKEN = 1 << 32


def fingerprint_digest(fingerprint: LayoutFingerprint) -> bytes:
    """16 bytes naming a layout: a record of another layout is ``foreign``."""
    return xxhash.xxh3_128_digest(msgspec.msgpack.encode(fingerprint))


@dataclass(frozen=True, slots=True)
class RecordHeader:
    fingerprint: bytes
    key: bytes
    parent: bytes
    num_tokens: int
    payload_len: int
    checksum: bytes

    @property
    def size(self) -> int:
        """Bytes of the whole record."""
        return record_size(self.num_tokens, self.payload_len)


def record_size(num_tokens: int, payload_len: int) -> int:
    return HEADER_SIZE + num_tokens * _TOKEN_BYTES + payload_len


def _token_bytes(token_ids: tuple[int, ...] | list[int]) -> bytes:
    if any(not 0 <= t < _MAX_TOKEN for t in token_ids):
        raise ValueError("token ids must fit in uint32")
    return np.asarray(token_ids, dtype="<u4").tobytes()


def encode_record(
    digest: bytes,
    key: bytes,
    parent: bytes,
    token_ids: tuple[int, ...] | list[int],
    payload: memoryview | bytes,
) -> bytes:
    """One record as bytes (a copy of ``payload``)."""
    if len(key) != KEY_SIZE or len(parent) != KEY_SIZE or len(digest) != KEY_SIZE:
        raise ValueError("key, parent and fingerprint digest must be 16 bytes")
    head = _HEAD.pack(MAGIC, RECORD_VERSION, 0, digest, key, parent, len(token_ids), len(payload))
    tokens = _token_bytes(token_ids)
    hasher = xxhash.xxh3_128(head)
    hasher.update(tokens)
    hasher.update(payload)
    return b"".join((head, _CHECK.pack(hasher.digest()), tokens, payload))


def decode_header(buf: bytes | memoryview, digest: bytes, max_tokens: int) -> RecordHeader:
    """Parse and sanity-check a header (the first ``HEADER_SIZE`` bytes of a record)."""
    if len(buf) < HEADER_SIZE:
        raise RecordError("truncated", f"record of {len(buf)} bytes has no full header")
    magic, version, _flags, fp, key, parent, ntok, plen = _HEAD.unpack_from(buf, 0)
    (check,) = _CHECK.unpack_from(buf, _HEAD.size)
    if magic != MAGIC or version != RECORD_VERSION:
        raise RecordError("foreign", f"not a v{RECORD_VERSION} chunk record")
    if fp != digest:
        raise RecordError("foreign", "record of another layout fingerprint")
    if not 1 <= ntok <= max_tokens:
        raise RecordError("bad_size", f"record claims {ntok} tokens (max {max_tokens})")
    return RecordHeader(bytes(fp), bytes(key), bytes(parent), ntok, plen, bytes(check))


def header_tokens(buf: bytes | memoryview, header: RecordHeader) -> tuple[int, ...]:
    """The token ids that follow the header (``buf`` holds at least header + tokens)."""
    end = HEADER_SIZE + header.num_tokens * _TOKEN_BYTES
    if len(buf) < end:
        raise RecordError("truncated", "record ends inside its token ids")
    return tuple(np.frombuffer(buf[HEADER_SIZE:end], dtype="<u4").tolist())


@dataclass(frozen=True, slots=True)
class Record:
    """A verified record: its header, token ids, a view of its payload and the raw bytes."""

    header: RecordHeader
    token_ids: tuple[int, ...]
    payload: memoryview
    raw: bytes


def verify_record(
    buf: bytes,
    digest: bytes,
    max_tokens: int,
    bytes_per_token: int,
    key: bytes | None = None,
) -> Record:
    """Check a whole record; return it parsed (payload as a view of ``buf``).

    Raises :class:`RecordError` with reason ``truncated`` / ``bad_size`` (length disagrees with
    the header or the layout), ``foreign`` (magic, version, fingerprint or key) or ``checksum``.
    """
    view = memoryview(buf)
    header = decode_header(view, digest, max_tokens)
    if key is not None and header.key != key:
        raise RecordError("foreign", "record holds another key")
    if header.payload_len != header.num_tokens * bytes_per_token:
        raise RecordError("bad_size", "payload length disagrees with the layout")
    if len(view) < header.size:
        raise RecordError("truncated", f"record of {len(view)} bytes, header says {header.size}")
    if len(view) > header.size:
        raise RecordError("bad_size", f"record of {len(view)} bytes, header says {header.size}")
    hasher = xxhash.xxh3_128(view[: _HEAD.size])
    hasher.update(view[HEADER_SIZE:])
    if hasher.digest() != header.checksum:
        raise RecordError("checksum", "record checksum mismatch")
    tokens = header_tokens(view, header)
    return Record(header, tokens, view[HEADER_SIZE + header.num_tokens * _TOKEN_BYTES :], buf)
