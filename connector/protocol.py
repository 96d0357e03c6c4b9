"""The scheduler <-> worker cache-lookup wire (ZMQ REQ/REP over ``ipc://``, msgpack).

vLLM asks ``get_num_new_matched_tokens`` in the scheduler, but each TP rank's chunk store lives
in its worker. The scheduler sends one :class:`LookupRequest` to every rank and takes the minimum
of the :class:`LookupReply` token counts. Every field is bounds-checked by the receiver.

PROTOCOL_VERSION history:
  1 - first version (lookup with a lease).
"""

from __future__ import annotations

import msgspec

__all__ = [
    "MAX_LOOKUP_TOKENS",
    "PROTOCOL_VERSION",
    "LookupReply",
    "LookupRequest",
    "decode_reply",
    "decode_request",
    "encode",
]

PROTOCOL_VERSION = 1
MAX_LOOKUP_TOKENS = 1 << 22
"""More prompt tokens than any model context; longer requests are refused."""


class LookupRequest(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """How many leading tokens of ``token_ids`` does this rank hold (at most ``max_tokens``)?

    The hit is pinned under ``lease_id`` until the worker loads it or is told to release it.
    """

    version: int
    lease_id: str
    token_ids: list[int]
    max_tokens: int
    block_size: int


class LookupReply(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """``num_tokens`` leading tokens are held (0 on a miss or an error).

    ``span_tiers`` / ``span_tokens``: per hit chunk, in order, the tier it was found in
    (``l1``/``l2``/``l3``) and the tokens of it the hit uses (for vLLM's per-source metrics).
    """

    version: int
    num_tokens: int
    error: str = ""
    span_tiers: list[str] = msgspec.field(default_factory=list)
    span_tokens: list[int] = msgspec.field(default_factory=list)


_ENCODER = msgspec.msgpack.Encoder()
_REQUEST = msgspec.msgpack.Decoder(LookupRequest)
_REPLY = msgspec.msgpack.Decoder(LookupReply)


def encode(message: LookupRequest | LookupReply) -> bytes:
    return _ENCODER.encode(message)


def decode_request(data: bytes) -> LookupRequest:
    """Decode and validate; raises ValueError for anything malformed."""
    try:
        request = _REQUEST.decode(data)
    except msgspec.DecodeError as exc:
        raise ValueError(f"bad lookup request: {exc}") from exc
    if request.version != PROTOCOL_VERSION:
        raise ValueError(f"lookup protocol version {request.version} != {PROTOCOL_VERSION}")
    if len(request.token_ids) > MAX_LOOKUP_TOKENS:
        raise ValueError(f"{len(request.token_ids)} tokens exceed {MAX_LOOKUP_TOKENS}")
    if not 0 <= request.max_tokens <= len(request.token_ids):
        raise ValueError(f"max_tokens {request.max_tokens} out of range")
    if request.block_size <= 0 or not request.lease_id or len(request.lease_id) > 512:
        raise ValueError("bad block size or lease id")
    return request


def decode_reply(data: bytes) -> LookupReply:
    try:
        reply = _REPLY.decode(data)
    except msgspec.DecodeError as exc:
        raise ValueError(f"bad lookup reply: {exc}") from exc
    if reply.version != PROTOCOL_VERSION or reply.num_tokens < 0:
        raise ValueError(f"bad lookup reply {reply}")
    if len(reply.span_tiers) != len(reply.span_tokens) or any(n < 0 for n in reply.span_tokens):
        raise ValueError("bad lookup reply spans")
    return reply
