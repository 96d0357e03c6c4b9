"""Shared helpers for the transfer tests: layouts, deterministic chunk data, peer processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import xxhash

from lmcache_disagg.config import LMCacheDisaggConfig
from lmcache_disagg.transfer.protocol import LayoutFingerprint

REPO = Path(__file__).resolve().parents[2]

# 2 layers x (K,V) x 32 tokens x 2 heads x 32 dims x float32 = 32 KiB pages.
FP = LayoutFingerprint(
    model="tiny-test",
    dtype="float32",
    num_layers=2,
    num_kv_heads=2,
    head_dim=32,
    chunk_size=32,
    tp_rank=0,
    tp_size=1,
)
FP_FIELDS = {name: getattr(FP, name) for name in FP.__struct_fields__}

FAST = {
    "listen_port": 0,
    "connect_timeout": 2.0,
    "handshake_timeout": 1.0,
    "reserve_timeout": 0.5,
    "push_deadline": 3.0,
    "reservation_ttl": 3.0,
}

CHANNELS = ["tcp", "nixl"]


def make_config(channel: str = "tcp", **overrides: Any) -> LMCacheDisaggConfig:
    values: dict[str, Any] = {"channel": channel, **FAST}
    values.setdefault("pool_size", FP.page_bytes * 64)
    values.setdefault("send_buffer_size", FP.page_bytes * 8)
    values.update(overrides)
    return LMCacheDisaggConfig(**values)


def chunk_plan(seed: int, n_chunks: int, last_tokens: int) -> list[tuple[int, int]]:
    """(nbytes, num_tokens) per chunk: full chunks, the last one holding ``last_tokens`` tokens."""
    per_token = FP.page_bytes // FP.chunk_size
    plan = [(FP.page_bytes, FP.chunk_size)] * (n_chunks - 1)
    plan.append((per_token * last_tokens, last_tokens))
    return plan


def chunk_data(seed: int, index: int, nbytes: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen)


def chunk_key(seed: int, index: int) -> bytes:
    return xxhash.xxh3_128_digest(f"{seed}:{index}".encode())


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


class PeerProcess:
    """A sender/receiver child process speaking JSON lines on stdout."""

    def __init__(self, module: str, spec: dict[str, Any]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, json.dumps(spec)],
            stdout=subprocess.PIPE,
            stdin=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env=_env(),
        )

    def read_event(self, timeout: float = 60.0) -> dict[str, Any]:
        """Next JSON line from the child (skips non-JSON lines such as library logs)."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                stderr = self.proc.stderr.read() if self.proc.stderr else ""
                raise AssertionError(f"child exited ({self.proc.poll()}): {stderr[-3000:]}")
            line = line.strip()
            if line.startswith("{"):
                return json.loads(line)
        raise AssertionError("child produced no event in time")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)

    def finish(self, timeout: float = 60.0) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.kill()
            for stream in (self.proc.stdout, self.proc.stderr, self.proc.stdin):
                if stream is not None:
                    stream.close()


@contextmanager
def peer_process(module: str, spec: dict[str, Any]) -> Iterator[PeerProcess]:
    child = PeerProcess(module, spec)
    try:
        yield child
    finally:
        child.kill()
        for stream in (child.proc.stdout, child.proc.stderr, child.proc.stdin):
            if stream is not None:
                stream.close()


def sender_spec(
    endpoint: str, channel: str, transfers: list[dict[str, Any]], **extra: Any
) -> dict[str, Any]:
    config = {"channel": channel, **FAST, "send_buffer_size": FP.page_bytes * 8}
    config.update(extra.pop("config", {}))
    return {
        "endpoint": endpoint,
        "config": config,
        "fingerprint": extra.pop("fingerprint", FP_FIELDS),
        "transfers": transfers,
        **extra,
    }


class RawPeer:
    """A hand-driven sender speaking the wire protocol directly (for fuzzing and fault tests)."""

    def __init__(
        self, endpoint: str, fingerprint: LayoutFingerprint = FP, secret: str | None = None
    ) -> None:
        import zmq

        from lmcache_disagg.transfer import auth
        from lmcache_disagg.transfer.protocol import (
            PROTOCOL_VERSION,
            Auth,
            ChannelOffer,
            Hello,
            HelloReply,
        )

        self.endpoint = endpoint
        self.host, port = endpoint.rsplit(":", 1)
        self.ctx: Any = zmq.Context()
        self.sock: Any = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(f"tcp://{self.host}:{port}")
        self.rid = 0
        nonce = auth.make_nonce()
        reply = self.request(
            lambda rid: Hello(
                rid, PROTOCOL_VERSION, fingerprint, nonce, channels=[ChannelOffer("tcp")]
            )
        )
        assert isinstance(reply, HelloReply), reply
        self.hello = reply
        self.session = reply.session
        if secret is not None:
            proof = auth.proof(secret, b"P", nonce, reply.nonce, fingerprint, reply.fingerprint)
            self.request(lambda rid: Auth(rid, self.session, proof))

    def request(self, make: Callable[[int], Any], timeout: float = 5.0) -> Any:
        from lmcache_disagg.transfer.protocol import decode_reply, encode

        self.rid += 1
        self.sock.send(encode(make(self.rid)))
        if not self.sock.poll(int(timeout * 1000)):
            raise AssertionError("no control reply")
        return decode_reply(self.sock.recv())

    def send_raw(self, payload: bytes) -> None:
        self.sock.send(payload)

    def reserve(self, transfer_id: str, n_pages: int, ttl: float = 30.0) -> Any:
        from lmcache_disagg.transfer.protocol import Reserve

        return self.request(lambda rid: Reserve(rid, self.session, transfer_id, n_pages, ttl))

    def finish(self, handle: int, n_chunks: int) -> Any:
        from lmcache_disagg.transfer.protocol import Finish

        return self.request(lambda rid: Finish(rid, self.session, handle, n_chunks))

    def data_port(self) -> int:
        """The data port in the hello reply's TCP channel entry."""
        from lmcache_disagg.transfer.protocol import TcpAccept, decode_params

        params = {offer.name: offer.params for offer in self.hello.channels}
        return decode_params(params["tcp"], TcpAccept).data_port

    def data_conn(self, session: bytes | None = None) -> Any:
        import socket

        from lmcache_disagg.transfer.channels.frames import pack_header
        from lmcache_disagg.transfer.protocol import FRAME_HEADER_SIZE, FRAME_HELLO

        sock = socket.create_connection((self.host, self.data_port()), timeout=5)
        header = bytearray(FRAME_HEADER_SIZE)
        pack_header(header, FRAME_HELLO, 0, 0, 0, 0, session or self.session)
        sock.sendall(header)
        return sock

    @staticmethod
    def chunk_frame(
        handle: int,
        index: int,
        payload: bytes,
        num_tokens: int,
        key: bytes = b"k",
        *,
        corrupt: bool = False,
    ) -> bytes:
        """Header + payload + trailer; ``corrupt`` flips one payload bit after checksumming."""
        from lmcache_disagg.transfer.channels.frames import pack_header
        from lmcache_disagg.transfer.protocol import FRAME_CHUNK, FRAME_HEADER_SIZE, FRAME_TRAILER

        header = bytearray(FRAME_HEADER_SIZE)
        pack_header(header, FRAME_CHUNK, handle, index, len(payload), num_tokens, key)
        trailer = FRAME_TRAILER.pack(xxhash.xxh3_64_intdigest(payload))
        body = bytearray(payload)
        if corrupt and body:
            body[len(body) // 2] ^= 0x01
        return bytes(header) + bytes(body) + trailer

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


def wait_closed(sock: Any, timeout: float = 10.0) -> bool:
    """True when the peer closes ``sock`` (EOF or reset) within ``timeout``."""
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not sock.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return False
