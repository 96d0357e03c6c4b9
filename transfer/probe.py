"""KV-path health probe for the proxy (torch-free, no NIXL): connect, handshake, authenticate.

``probe("10.0.0.5:17555", timeout=1.0, cluster_secret=...)`` checks that D's KV listener answers the
transfer handshake and, with a secret, that it proves the secret and accepts ours. It never
reserves pages. Each call opens and closes its own zmq socket (no shared state); the proxy calls it
from a worker thread (``asyncio.to_thread``) because it blocks for up to ``timeout``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import msgspec
import zmq

from lmcache_disagg.config import ConfigError, split_host_port
from lmcache_disagg.transfer import auth
from lmcache_disagg.transfer.protocol import (
    PROTOCOL_VERSION,
    Auth,
    AuthReply,
    ErrorReply,
    Hello,
    HelloReply,
    LayoutFingerprint,
    Reply,
    decode_reply,
    encode,
)

__all__ = ["ProbeResult", "probe"]


@dataclass(frozen=True)
class ProbeResult:
    """``ok`` means reachable, protocol-compatible and (if a secret is given) authenticated.

    ``error`` is a short reason ("unreachable", "auth", "protocol", ...) and ``detail`` a message.
    """

    ok: bool
    endpoint: str
    latency_s: float
    authenticated: bool = False
    fingerprint: LayoutFingerprint | None = None
    channel: str = ""
    error: str = ""
    detail: str = ""


def _request(sock: zmq.Socket[bytes], message: Hello | Auth, deadline: float) -> Reply | None:
    sock.send(encode(message), zmq.NOBLOCK)
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not sock.poll(max(1, int(remaining * 1000))):
            return None
        try:
            reply = decode_reply(sock.recv(zmq.NOBLOCK))
        except (msgspec.DecodeError, msgspec.ValidationError):
            return ErrorReply(message.rid, "protocol", "malformed reply")
        if reply.rid == message.rid:
            return reply


def probe(endpoint: str, timeout: float, cluster_secret: str | None = None) -> ProbeResult:
    """Handshake with the KV receiver at ``endpoint`` (``host:port``) within ``timeout`` seconds."""
    started = time.monotonic()
    deadline = started + timeout

    def result(
        ok: bool,
        error: str = "",
        detail: str = "",
        *,
        authenticated: bool = False,
        fingerprint: LayoutFingerprint | None = None,
        channel: str = "",
    ) -> ProbeResult:
        elapsed = time.monotonic() - started
        return ProbeResult(
            ok, endpoint, elapsed, authenticated, fingerprint, channel, error=error, detail=detail
        )

    try:
        host, port = split_host_port(endpoint)
    except ConfigError:
        return result(False, "protocol", f"bad endpoint {endpoint!r}")
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(f"tcp://{host}:{port}")
        nonce = auth.make_nonce()
        reply = _request(sock, Hello(1, PROTOCOL_VERSION, None, nonce, probe=True), deadline)
        if reply is None:
            return result(False, "unreachable", f"no handshake reply within {timeout:.3g}s")
        if isinstance(reply, ErrorReply):
            return result(False, reply.kind, reply.message)
        if not isinstance(reply, HelloReply):
            return result(False, "protocol", f"unexpected reply {type(reply).__name__}")
        channel = reply.channels[0].name if reply.channels else "tcp"
        if cluster_secret is None:
            if reply.auth_required:
                return result(
                    False,
                    "auth",
                    "receiver requires the cluster secret",
                    fingerprint=reply.fingerprint,
                )
            return result(True, fingerprint=reply.fingerprint, channel=channel)
        if not reply.auth_required or not auth.verify(
            cluster_secret, b"D", reply.proof, nonce, reply.nonce, None, reply.fingerprint
        ):
            return result(False, "auth", "receiver did not prove the cluster secret")
        proof = auth.proof(cluster_secret, b"P", nonce, reply.nonce, None, reply.fingerprint)
        auth_reply = _request(sock, Auth(2, reply.session, proof), deadline)
        if auth_reply is None:
            return result(False, "unreachable", "no auth reply before the deadline")
        if not isinstance(auth_reply, AuthReply) or not auth_reply.ok:
            return result(False, "auth", "receiver refused our proof")
        return result(True, authenticated=True, fingerprint=reply.fingerprint, channel=channel)
    except zmq.ZMQError as exc:
        return result(False, "unreachable", str(exc))
    finally:
        sock.close(0)
