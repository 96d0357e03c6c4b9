"""Sessions: the handshake, its authentication, and D's session table (torch-free).

Both sides of the handshake live here so they are read together:

* P: :func:`check_hello_reply` verifies D's :class:`~.protocol.HelloReply` (fingerprint, pool,
  D's HMAC proof) and returns P's own proof for the :class:`~.protocol.Auth` step (or None).
* D: :func:`check_hello` validates a hello, :func:`new_session` answers it, and
  :class:`SessionTable` keeps authenticated sessions (LRU) apart from half-open ones (hello without
  auth yet), so a flood of hellos or probes can never evict a working sender's session.
"""

from __future__ import annotations

import collections
import secrets
import threading
from dataclasses import dataclass

from lmcache_disagg.transfer import auth
from lmcache_disagg.transfer.errors import (
    AuthenticationFailed,
    FingerprintMismatch,
    ProtocolViolation,
    UnknownSession,
)
from lmcache_disagg.transfer.protocol import (
    MAX_CHANNEL_OFFERS,
    MAX_CHANNEL_PARAMS,
    PROTOCOL_VERSION,
    Hello,
    HelloReply,
    LayoutFingerprint,
)

__all__ = [
    "MAX_HALF_OPEN",
    "MAX_SESSIONS",
    "SESSION_ID_BYTES",
    "Session",
    "SessionTable",
    "check_hello",
    "check_hello_reply",
    "new_session",
]

MAX_SESSIONS = 1024
MAX_HALF_OPEN = 256
SESSION_ID_BYTES = 16


@dataclass(eq=False)
class Session:
    """D's view of one sender's session."""

    sid: bytes
    authed: bool
    probe: bool
    p_nonce: bytes
    d_nonce: bytes
    p_fp: LayoutFingerprint | None
    fenced: bool = True
    """False once a channel accepted for it lets the peer write into the pool directly."""


# -- P side ------------------------------------------------------------------------------------


def check_hello_reply(
    reply: HelloReply,
    fingerprint: LayoutFingerprint,
    secret: str | None,
    nonce: bytes,
    target: str,
) -> bytes | None:
    """Verify D's half of the handshake; P's HMAC proof to send in :class:`Auth`, or None when no
    secret is configured. Raises FingerprintMismatch, ProtocolViolation, AuthenticationFailed."""
    fields = fingerprint.diff(reply.fingerprint)
    if fields:
        raise FingerprintMismatch(f"receiver layout differs in {', '.join(fields)}", fields)
    if reply.page_bytes != fingerprint.page_bytes or reply.n_pages <= 0:
        raise ProtocolViolation("receiver announced an inconsistent pool")
    if secret is None:
        if reply.auth_required:
            raise AuthenticationFailed(
                f"KV receiver {target} requires the cluster secret; set cluster_secret "
                "(same value on P and D)"
            )
        return None
    if not reply.auth_required or not auth.verify(
        secret, b"D", reply.proof, nonce, reply.nonce, fingerprint, reply.fingerprint
    ):
        raise AuthenticationFailed(f"KV receiver {target} failed to prove the cluster secret")
    return auth.proof(secret, b"P", nonce, reply.nonce, fingerprint, reply.fingerprint)


# -- D side ------------------------------------------------------------------------------------


def check_hello(hello: Hello, fingerprint: LayoutFingerprint) -> None:
    """Refuse a malformed or incompatible hello (ProtocolViolation, FingerprintMismatch)."""
    if hello.version != PROTOCOL_VERSION:
        raise ProtocolViolation(
            f"protocol version {hello.version} != {PROTOCOL_VERSION}; upgrade both sides"
        )
    if len(hello.nonce) != auth.NONCE_BYTES or len(hello.channels) > MAX_CHANNEL_OFFERS:
        raise ProtocolViolation("malformed hello")
    if any(len(o.name) > 64 or len(o.params) > MAX_CHANNEL_PARAMS for o in hello.channels):
        raise ProtocolViolation("malformed hello")
    if hello.fingerprint is None:
        if not hello.probe:
            raise ProtocolViolation("hello without a fingerprint")
        return
    try:
        hello.fingerprint.validate()
    except ValueError as exc:
        raise ProtocolViolation(str(exc)) from exc
    fields = hello.fingerprint.diff(fingerprint)
    if fields:
        detail = ", ".join(
            f"{name}: sender {getattr(hello.fingerprint, name)!r} != receiver "
            f"{getattr(fingerprint, name)!r}"
            for name in fields
        )
        raise FingerprintMismatch(
            f"KV layout fingerprint mismatch ({detail}); P and D must serve the same "
            "model, dtype, chunk_size and TP layout",
            fields,
        )


def new_session(
    hello: Hello, fingerprint: LayoutFingerprint, secret: str | None
) -> tuple[Session, bytes]:
    """A session for a checked hello, and D's proof (empty without a secret)."""
    d_nonce = auth.make_nonce()
    session = Session(
        sid=secrets.token_bytes(SESSION_ID_BYTES),
        authed=secret is None,
        probe=hello.probe,
        p_nonce=hello.nonce,
        d_nonce=d_nonce,
        p_fp=hello.fingerprint,
    )
    proof = b""
    if secret is not None:
        proof = auth.proof(secret, b"D", hello.nonce, d_nonce, hello.fingerprint, fingerprint)
    return session, proof


def verify_auth(
    session: Session, proof: bytes, fingerprint: LayoutFingerprint, secret: str
) -> bool:
    """Whether P's :class:`Auth` proof for ``session`` verifies."""
    return auth.verify(
        secret, b"P", proof, session.p_nonce, session.d_nonce, session.p_fp, fingerprint
    )


class SessionTable:
    """Authenticated sessions (LRU, at most :data:`MAX_SESSIONS`) and half-open ones (at most
    :data:`MAX_HALF_OPEN`). Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sessions: collections.OrderedDict[bytes, Session] = collections.OrderedDict()
        self._half_open: collections.OrderedDict[bytes, Session] = collections.OrderedDict()

    def add(self, session: Session) -> list[Session]:
        """Keep ``session``: authenticated non-probe ones in the table, unauthenticated ones as
        half-open. Returns the sessions evicted to make room."""
        with self._lock:
            if session.authed and not session.probe:
                self._sessions[session.sid] = session
                evicted = []
                while len(self._sessions) > MAX_SESSIONS:
                    evicted.append(self._sessions.popitem(last=False)[1])
                return evicted
            if not session.authed:
                self._half_open[session.sid] = session
                while len(self._half_open) > MAX_HALF_OPEN:
                    self._half_open.popitem(last=False)
            return []

    def pop_half_open(self, sid: bytes) -> Session:
        with self._lock:
            session = self._half_open.pop(sid, None)
        if session is None:
            raise UnknownSession("unknown session")
        return session

    def get(self, sid: bytes) -> Session:
        """The authenticated, non-probe session ``sid`` (refreshing its LRU place)."""
        with self._lock:
            session = self._sessions.get(sid)
            if session is not None:
                self._sessions.move_to_end(sid)
            elif sid in self._half_open:
                raise AuthenticationFailed("session is not authenticated")
        if session is None:
            raise UnknownSession("unknown session (the receiver restarted?); handshake again")
        if session.probe:
            raise ProtocolViolation("probe sessions cannot reserve")
        return session

    def live(self, session: Session) -> bool:
        with self._lock:
            return self._sessions.get(session.sid) is session
