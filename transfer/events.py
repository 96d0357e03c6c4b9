"""The KV events wire format: what a worker's chunk store tells routers (torch-free).

A worker publishes, over a ZMQ PUB socket, which chunk keys its store holds in which tier. It never
sends KV bytes. The shape follows vLLM's own KV events (``--kv-events-config``: msgpack
``BlockStored`` / ``BlockRemoved`` batches with a sequence number), with what cache-aware routing
across hosts needs on top:

* every message names its publisher, the publisher's *epoch* (random per process start, so a
  restart is visible), and the publisher's :class:`LayoutFingerprint`;
* :class:`EventBatch` carries a per-publisher sequence number ``seq`` (1, 2, 3, ... per epoch); a
  subscriber that sees ``seq`` jump has lost batches (PUB drops under its high-water mark);
* :class:`Heartbeat` repeats the last ``seq`` sent, so a loss is detected even when the publisher
  goes quiet, and its absence tells a subscriber the worker is gone;
* :class:`SnapshotRequest` / :class:`SnapshotReply` (on a separate ROUTER socket) give a subscriber
  the publisher's whole current key set as of a ``seq``, to resync after a reconnect, a restart or
  a gap.

PUB frames are ``[topic, payload]`` with topic :data:`TOPIC`; the payload decodes as
:data:`PubMessage`. The snapshot socket exchanges single-frame :data:`SnapshotMessage` payloads.
Every field a peer sends is checked by the decoder (types, key lengths, list bounds) and then by
:func:`validate_fingerprint`; a message that fails is dropped and counted by the receiver.

Evolution: new fields go last with defaults; tags never change; bump
:data:`EVENTS_PROTOCOL_VERSION` only for an incompatible change.

History of ``EVENTS_PROTOCOL_VERSION``:

1. first version: stored / evicted / promoted, heartbeat, snapshot.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

import msgspec

from lmcache_disagg.keys import KEY_BYTES
from lmcache_disagg.transfer.protocol import LayoutFingerprint

__all__ = [
    "DEFAULT_EVENTS_PORT",
    "EVENTS_PROTOCOL_VERSION",
    "MAX_BATCH_KEYS",
    "MAX_EVENT_MESSAGE",
    "MAX_SNAPSHOT_KEYS",
    "TIERS",
    "TOPIC",
    "ChunkEvent",
    "ChunkEvicted",
    "ChunkPromoted",
    "ChunkStored",
    "EventBatch",
    "Heartbeat",
    "PubMessage",
    "SnapshotMessage",
    "SnapshotReply",
    "SnapshotRequest",
    "TierKeys",
    "TierName",
    "decode_pub",
    "decode_snapshot",
    "encode",
    "validate_fingerprint",
]

EVENTS_PROTOCOL_VERSION: Final = 1
DEFAULT_EVENTS_PORT: Final = 17570
"""A worker's PUB port when only the host is known (TP rank r adds 2r; the snapshot port is +1)."""
TOPIC: Final = b"kv"
MAX_BATCH_KEYS: Final = 4096
"""Most keys one event (and one batch, over all its events) carries; publishers split larger ones."""
MAX_SNAPSHOT_KEYS: Final = 1 << 20
"""Most keys one snapshot reply carries per tier (a publisher tracks at most this many keys)."""
MAX_EVENT_MESSAGE: Final = 64 << 20
"""zmq MAXMSGSIZE on the receiving sockets: a snapshot of MAX_SNAPSHOT_KEYS keys in every tier fits."""
MAX_PUBLISHER_ID: Final = 256

TierName = Literal["l1", "l2", "l3"]
TIERS: Final[tuple[TierName, ...]] = ("l1", "l2", "l3")

Key = Annotated[bytes, msgspec.Meta(min_length=KEY_BYTES, max_length=KEY_BYTES)]
BatchKeys = Annotated[list[Key], msgspec.Meta(min_length=1, max_length=MAX_BATCH_KEYS)]
PublisherId = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_PUBLISHER_ID)]
Seq = Annotated[int, msgspec.Meta(ge=0, le=(1 << 63) - 1)]
Epoch = Annotated[int, msgspec.Meta(ge=0, le=(1 << 63) - 1)]


class ChunkStored(msgspec.Struct, tag="stored", array_like=True, frozen=True):
    """``keys`` are now readable from ``tier`` (a commit in L1, a finished write in L2/L3)."""

    keys: BatchKeys
    tier: TierName


class ChunkEvicted(msgspec.Struct, tag="evicted", array_like=True, frozen=True):
    """``keys`` are no longer in ``tier`` (they may still be in another tier)."""

    keys: BatchKeys
    tier: TierName


class ChunkPromoted(msgspec.Struct, tag="promoted", array_like=True, frozen=True):
    """``keys`` were copied up from ``source`` into ``tier`` (they stay in ``source`` too)."""

    keys: BatchKeys
    tier: TierName
    source: TierName


ChunkEvent = ChunkStored | ChunkEvicted | ChunkPromoted


class EventBatch(msgspec.Struct, tag="batch", array_like=True, frozen=True):
    """Events in the order the store produced them; ``seq`` is 1 + the previous batch's."""

    publisher: PublisherId
    epoch: Epoch
    seq: Seq
    fingerprint: LayoutFingerprint
    events: Annotated[list[ChunkEvent], msgspec.Meta(max_length=MAX_BATCH_KEYS)]
    sent_at: float = 0.0
    """Publisher's wall clock (seconds since the epoch), for lag metrics only."""


class Heartbeat(msgspec.Struct, tag="heartbeat", array_like=True, frozen=True):
    """Sent every heartbeat interval; ``seq`` is the last batch sent (0: none yet)."""

    publisher: PublisherId
    epoch: Epoch
    seq: Seq
    fingerprint: LayoutFingerprint
    interval: Annotated[float, msgspec.Meta(gt=0, le=3600)]
    """The publisher's heartbeat interval in seconds, so a subscriber can scale its expiry."""
    sent_at: float = 0.0


PubMessage = EventBatch | Heartbeat


class SnapshotRequest(msgspec.Struct, tag="snapshot_request", array_like=True, frozen=True):
    version: int = EVENTS_PROTOCOL_VERSION


class TierKeys(msgspec.Struct, array_like=True, frozen=True):
    tier: TierName
    keys: Annotated[list[Key], msgspec.Meta(max_length=MAX_SNAPSHOT_KEYS)]


class SnapshotReply(msgspec.Struct, tag="snapshot", array_like=True, frozen=True):
    """The publisher's key set after batch ``seq`` (batches ``> seq`` apply on top of it)."""

    publisher: PublisherId
    epoch: Epoch
    seq: Seq
    fingerprint: LayoutFingerprint
    tiers: Annotated[list[TierKeys], msgspec.Meta(max_length=len(TIERS))]
    version: int = EVENTS_PROTOCOL_VERSION


SnapshotMessage = SnapshotRequest | SnapshotReply

_ENCODER: Final = msgspec.msgpack.Encoder()
_PUB_DECODER: Final = msgspec.msgpack.Decoder(PubMessage)
_SNAPSHOT_DECODER: Final = msgspec.msgpack.Decoder(SnapshotMessage)


def encode(message: PubMessage | SnapshotMessage) -> bytes:
    return _ENCODER.encode(message)


def decode_pub(payload: bytes) -> PubMessage:
    """Decode and validate a PUB payload; raises ValueError on anything malformed."""
    try:
        message = _PUB_DECODER.decode(payload)
    except msgspec.DecodeError as exc:
        raise ValueError(f"bad kv event message: {exc}") from exc
    validate_fingerprint(message.fingerprint)
    if isinstance(message, EventBatch):
        total = sum(len(event.keys) for event in message.events)
        if total > MAX_BATCH_KEYS:
            raise ValueError(f"batch carries {total} keys, at most {MAX_BATCH_KEYS} allowed")
        if message.seq == 0:
            raise ValueError("batch seq must be >= 1")
    return message


def decode_snapshot(payload: bytes) -> SnapshotMessage:
    """Decode and validate a snapshot-socket payload; raises ValueError on anything malformed."""
    try:
        message = _SNAPSHOT_DECODER.decode(payload)
    except msgspec.DecodeError as exc:
        raise ValueError(f"bad kv snapshot message: {exc}") from exc
    if message.version != EVENTS_PROTOCOL_VERSION:
        raise ValueError(
            f"kv events protocol version {message.version}, this side speaks "
            f"{EVENTS_PROTOCOL_VERSION}: upgrade the older of proxy and worker"
        )
    if isinstance(message, SnapshotReply):
        validate_fingerprint(message.fingerprint)
        if len({entry.tier for entry in message.tiers}) != len(message.tiers):
            raise ValueError("snapshot names a tier twice")
    return message


def validate_fingerprint(fingerprint: LayoutFingerprint) -> None:
    """Raise ValueError when a peer's fingerprint is out of range."""
    fingerprint.validate()
