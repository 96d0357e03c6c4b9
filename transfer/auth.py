"""Mutual HMAC authentication for the transfer handshake (torch-free).

Both sides prove knowledge of the cluster secret without sending it: each sends a random nonce, and
each answers with ``HMAC-SHA256(secret, role || transcript)`` where the transcript binds both nonces
and both layout fingerprints (so a proof can't be replayed for another session or layout). The
secret itself never leaves this module's arguments and is never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

import msgspec

from lmcache_disagg.transfer.protocol import PROTOCOL_VERSION, LayoutFingerprint

__all__ = ["NONCE_BYTES", "make_nonce", "proof", "verify"]

NONCE_BYTES = 32
_FP_ENCODER = msgspec.msgpack.Encoder()


def make_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def _transcript(
    p_nonce: bytes,
    d_nonce: bytes,
    p_fp: LayoutFingerprint | None,
    d_fp: LayoutFingerprint | None,
) -> bytes:
    parts = [
        b"lmcache-disagg-transfer",
        str(PROTOCOL_VERSION).encode(),
        p_nonce,
        d_nonce,
        _FP_ENCODER.encode(p_fp),
        _FP_ENCODER.encode(d_fp),
    ]
    return b"\x00".join(hashlib.sha256(part).digest() for part in parts)


def proof(
    secret: str,
    role: bytes,
    p_nonce: bytes,
    d_nonce: bytes,
    p_fp: LayoutFingerprint | None,
    d_fp: LayoutFingerprint | None,
) -> bytes:
    """``role`` is b"P" (sender's proof) or b"D" (receiver's proof)."""
    message = role + _transcript(p_nonce, d_nonce, p_fp, d_fp)
    return hmac.new(secret.encode(), message, hashlib.sha256).digest()


def verify(
    secret: str,
    role: bytes,
    candidate: bytes,
    p_nonce: bytes,
    d_nonce: bytes,
    p_fp: LayoutFingerprint | None,
    d_fp: LayoutFingerprint | None,
) -> bool:
    expected = proof(secret, role, p_nonce, d_nonce, p_fp, d_fp)
    return hmac.compare_digest(expected, candidate)
