"""Every wire format of the KV transfer layer (torch-free; the proxy imports it for probes).

Two boundaries share this module:

* **Control plane** (pyzmq DEALER -> ROUTER on D's KV endpoint): msgspec msgpack structs, one tagged
  union :data:`Request` (P -> D) and one :data:`Reply` (D -> P). Every request carries ``rid`` so P
  can match replies; every field D receives is bounds-checked before use.
* **TCP data channel** (plain socket to the data port in the hello reply's "tcp" channel offer): frames with a
  fixed :data:`FRAME_HEADER_SIZE`-byte header (:data:`FRAME_HEADER`), then (chunk frames) ``nbytes``
  payload bytes that the receiver reads straight into the reserved pool page, then an 8-byte
  trailer (:data:`FRAME_TRAILER`). The header's checksum field is an xxh3-64 over the header's
  first 36 bytes and the key, verified before any payload byte is written anywhere; the trailer is
  the xxh3-64 of the payload. Putting the payload checksum last lets both ends hash each slice
  while it is hot in cache (the sender right before sending it, the receiver right after reading).

PROTOCOL_VERSION history (bump on any incompatible change; add fields only at the end, with defaults):

* 1 (2026-11-22): first version: hello/auth/reserve/finish/cancel, TCP frames v1, NIXL notifs v1.
* 2 (2026-12-02): channels are advertised generically: ``Hello.channels`` (what P can push over,
  in its order of preference) and ``HelloReply.channels`` (what D accepts) carry
  :class:`ChannelOffer` entries whose ``params`` each channel module encodes itself; they replace
  ``want_nixl``/``nixl_*`` of both and ``data_port``/``pool_base`` of the reply. TCP frame headers
  and NIXL notifications drop the ``slot`` field (it always equalled ``index``).
* 3 (2026-12-02): reuse: ``Reserve.keys`` carries the transfer's chunk keys and
  ``ReserveReply.held`` says how many leading chunks D already holds (P does not push those).
"""

from __future__ import annotations

import struct
from typing import Final, TypeVar

import msgspec

__all__ = [
    "CONTROL_MAX_MESSAGE",
    "DTYPE_SIZES",
    "FRAME_CHECKSUM_SPAN",
    "FRAME_CHUNK",
    "FRAME_HEADER",
    "FRAME_HEADER_SIZE",
    "FRAME_HELLO",
    "FRAME_MAGIC",
    "FRAME_TRAILER",
    "MAX_CHANNEL_OFFERS",
    "MAX_CHANNEL_PARAMS",
    "MAX_KEY_BYTES",
    "MAX_TRANSFER_ID_LEN",
    "NIXL_NOTIF",
    "PROTOCOL_VERSION",
    "Auth",
    "AuthReply",
    "Cancel",
    "CancelReply",
    "ChannelOffer",
    "ChannelParams",
    "ErrorReply",
    "Finish",
    "FinishReply",
    "Hello",
    "HelloReply",
    "LayoutFingerprint",
    "NixlAccept",
    "NixlHello",
    "Reply",
    "Request",
    "Reserve",
    "ReserveReply",
    "TcpAccept",
    "decode_params",
    "decode_reply",
    "decode_request",
    "encode",
    "encode_params",
]

PROTOCOL_VERSION: Final = 3

DTYPE_SIZES: Final[dict[str, int]] = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int8": 1,
    "uint8": 1,
}

MAX_KEY_BYTES: Final = 64
"""Longest chunk key a frame carries (blake2b-512 fits)."""
MAX_TRANSFER_ID_LEN: Final = 256
CONTROL_MAX_MESSAGE: Final = 1 << 20
"""zmq MAXMSGSIZE on D's control socket: larger messages are dropped by zmq itself."""


class LayoutFingerprint(msgspec.Struct, frozen=True):
    """Everything that must match for P's chunk bytes to mean the same thing on D.

    A canonical chunk page is ``[num_layers, 2 (K, V), chunk_size, num_kv_heads, head_dim]`` in
    ``dtype``; a partial (last) chunk uses the first ``num_tokens`` token rows of that layout, i.e.
    the page's first ``nbytes`` bytes when tokens are the outer dimension inside each (layer, K/V).
    The transfer layer itself only moves bytes; the layout is the connector's contract.
    """

    model: str
    dtype: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    chunk_size: int
    tp_rank: int
    tp_size: int
    kv_layout: str = "canonical-v1"

    @property
    def itemsize(self) -> int:
        try:
            return DTYPE_SIZES[self.dtype]
        except KeyError:
            raise ValueError(
                f"unknown dtype {self.dtype!r}; expected one of {sorted(DTYPE_SIZES)}"
            ) from None

    @property
    def page_bytes(self) -> int:
        """Bytes of one FULL chunk page."""
        return (
            self.num_layers
            * 2
            * self.chunk_size
            * self.num_kv_heads
            * self.head_dim
            * self.itemsize
        )

    def diff(self, other: LayoutFingerprint) -> list[str]:
        """Names of the fields whose values differ (empty when compatible)."""
        return [
            name for name in self.__struct_fields__ if getattr(self, name) != getattr(other, name)
        ]

    def validate(self) -> None:
        """Raise ValueError when a field is out of range (used on peer-supplied fingerprints)."""
        _ = self.itemsize
        for name in ("num_layers", "num_kv_heads", "head_dim", "chunk_size", "tp_size"):
            value = getattr(self, name)
            if not 0 < value <= 1 << 20:
                raise ValueError(f"fingerprint field {name}={value} out of range")
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"fingerprint tp_rank={self.tp_rank} not in [0, {self.tp_size})")
        if len(self.model) > 1024 or len(self.kv_layout) > 64:
            raise ValueError("fingerprint strings too long")


# -- control plane: P -> D ----------------------------------------------------------------------


class ChannelOffer(msgspec.Struct, frozen=True):
    """One data channel in a handshake: ``name`` (e.g. "tcp", "nixl") and the parameters that
    channel's module encodes and decodes itself (:func:`encode_params` / :func:`decode_params`)."""

    name: str
    params: bytes = b""


MAX_CHANNEL_OFFERS: Final = 8
MAX_CHANNEL_PARAMS: Final = 64 << 10


class Hello(msgspec.Struct, tag="hello", frozen=True):
    """Opens a session. ``nonce`` is P's 32-byte challenge; ``probe`` asks for no session.

    ``channels``: the channels P can push over, most preferred first.
    """

    rid: int
    version: int
    fingerprint: LayoutFingerprint | None
    nonce: bytes
    probe: bool = False
    channels: list[ChannelOffer] = []


class Auth(msgspec.Struct, tag="auth", frozen=True):
    """P's answer to D's challenge: HMAC(secret, "P" || transcript)."""

    rid: int
    session: bytes
    proof: bytes


class Reserve(msgspec.Struct, tag="reserve", frozen=True):
    """One reservation round trip per transfer: ``n_pages`` pages for ``ttl`` seconds.

    ``keys``: the chunk keys of the transfer (empty, or one per page), so D can say which
    leading chunks it already holds.
    """

    rid: int
    session: bytes
    transfer_id: str
    n_pages: int
    ttl: float
    keys: list[bytes] = []


class Finish(msgspec.Struct, tag="finish", frozen=True):
    """Sent after the last chunk left P; ``n_chunks`` = how many chunks were written (<= reserved).

    D answers once every one of those chunks arrived and verified (or the transfer failed).
    """

    rid: int
    session: bytes
    handle: int
    n_chunks: int


class Cancel(msgspec.Struct, tag="cancel", frozen=True):
    """Drop the reservation ``handle``; idempotent."""

    rid: int
    session: bytes
    handle: int


Request = Hello | Auth | Reserve | Finish | Cancel


# -- control plane: D -> P ----------------------------------------------------------------------


class HelloReply(msgspec.Struct, tag="hello_reply", frozen=True):
    """D's half of the handshake.

    ``proof`` is HMAC(secret, "D" || transcript) when D has a cluster secret, else empty. Without a
    secret the session is usable at once; with one, only after :class:`Auth` succeeded.
    ``channels``: those of P's offers D accepts, each with D's parameters for it.
    """

    rid: int
    version: int
    fingerprint: LayoutFingerprint
    nonce: bytes
    proof: bytes
    auth_required: bool
    session: bytes
    page_bytes: int
    n_pages: int
    channels: list[ChannelOffer] = []


class AuthReply(msgspec.Struct, tag="auth_reply", frozen=True):
    rid: int
    ok: bool


class ReserveReply(msgspec.Struct, tag="reserve_reply", frozen=True):
    """``pages`` are pool page indices in slot order (slot i -> pages[i]).

    ``held``: chunks ``[0, held)`` are already on D (pinned there); P must not push them.
    """

    rid: int
    handle: int
    pages: list[int]
    held: int = 0


class FinishReply(msgspec.Struct, tag="finish_reply", frozen=True):
    """``state`` is "COMPLETE" or "FAILED" (with ``reason``)."""

    rid: int
    state: str
    reason: str = ""


class CancelReply(msgspec.Struct, tag="cancel_reply", frozen=True):
    rid: int


class ErrorReply(msgspec.Struct, tag="error", frozen=True):
    """A refused request. ``kind`` is an errors.py ``reason`` (e.g. "no_room", "fingerprint")."""

    rid: int
    kind: str
    message: str
    fields: list[str] = []


Reply = HelloReply | AuthReply | ReserveReply | FinishReply | CancelReply | ErrorReply

_ENCODER = msgspec.msgpack.Encoder()
_REQUEST_DECODER = msgspec.msgpack.Decoder(Request)
_REPLY_DECODER = msgspec.msgpack.Decoder(Reply)


def encode(message: Request | Reply) -> bytes:
    return _ENCODER.encode(message)


def decode_request(data: bytes) -> Request:
    """Raises msgspec.DecodeError / ValidationError on anything malformed."""
    return _REQUEST_DECODER.decode(data)


def decode_reply(data: bytes) -> Reply:
    return _REPLY_DECODER.decode(data)


# -- channel parameters (inside ChannelOffer.params) ---------------------------------------------


class TcpAccept(msgspec.Struct, frozen=True):
    """D's TCP channel: the data port P connects to."""

    data_port: int


class NixlHello(msgspec.Struct, frozen=True):
    """P's NIXL channel: its agent name and metadata (D loads it to accept notifications)."""

    agent: str
    metadata: bytes


class NixlAccept(msgspec.Struct, frozen=True):
    """D's NIXL channel: its agent, metadata, and where its registered receive pool starts."""

    agent: str
    metadata: bytes
    pool_base: int
    mem: str = "DRAM"
    dev: int = 0


ChannelParams = TcpAccept | NixlHello | NixlAccept
_P = TypeVar("_P", TcpAccept, NixlHello, NixlAccept)


def encode_params(params: ChannelParams) -> bytes:
    return _ENCODER.encode(params)


def decode_params(data: bytes, kind: type[_P]) -> _P:
    """Raises msgspec.DecodeError / ValidationError on anything malformed."""
    return msgspec.msgpack.decode(data, type=kind)


# -- TCP data frames ----------------------------------------------------------------------------

FRAME_MAGIC: Final = b"LMKV"
FRAME_CHUNK: Final = 1
"""A chunk: payload of ``nbytes`` follows the header."""
FRAME_HELLO: Final = 2
"""First frame on a data connection: ``key`` holds the session id, ``nbytes`` = 0."""

# magic, version, kind, flags, handle, index, nbytes, num_tokens, key_len, reserved,
# header checksum, key (zero padded to MAX_KEY_BYTES). The header checksum covers bytes [0, 36) and
# key[:key_len]; chunk frames end with FRAME_TRAILER = xxh3-64 of the payload. Chunk ``index`` is
# also the reservation slot it lands in (D's ReserveReply lists the page of each slot).
FRAME_HEADER: Final = struct.Struct(f"<4sBBHQIQIHHQ{MAX_KEY_BYTES}s")
FRAME_HEADER_SIZE: Final = FRAME_HEADER.size
FRAME_CHECKSUM_SPAN: Final = 36
FRAME_TRAILER: Final = struct.Struct("<Q")

# NIXL notification attached to each WRITE: b"K" + struct below + key[:key_len]; the fields are
# handle, index, nbytes, num_tokens, key_len.
NIXL_NOTIF: Final = struct.Struct("<cQIQIH")
