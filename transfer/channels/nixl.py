"""The NIXL channel: one WRITE per chunk into D's registered pool, with a notification each.

P (:class:`NixlSendChannel`, :class:`NixlLink`): the sender's agent registers its staging pages
once; the pump posts WRITEs and reaps them oldest first, handing pages back to the producer once a
WRITE finished, and sends a push's finish notice only after all its WRITEs completed.

D (:class:`NixlReceiveChannel`): the receiver's agent registers the receive pool once; D's control
thread polls notifications (:meth:`NixlReceiveChannel.poll`) and commits each chunk. D cannot fence
remote writes, so this channel is not ``fenced`` (the receiver quarantines pages of unfinished
transfers).
"""

from __future__ import annotations

import collections
import logging
import secrets
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import msgspec
import torch

from lmcache_disagg.transfer.channels.base import (
    ChunkItem,
    ChunkSink,
    FinishItem,
    PumpHost,
    ReceiveChannel,
    SendChannel,
    SendLink,
    StopItem,
)
from lmcache_disagg.transfer.errors import PeerClosed, PeerUnreachable, ProtocolViolation
from lmcache_disagg.transfer.nixl_agent import NixlAgent
from lmcache_disagg.transfer.pool import SendPage
from lmcache_disagg.transfer.protocol import (
    MAX_KEY_BYTES,
    NIXL_NOTIF,
    NixlAccept,
    NixlHello,
    decode_params,
    encode_params,
)
from lmcache_disagg.transfer.session import MAX_HALF_OPEN, MAX_SESSIONS, Session

if TYPE_CHECKING:
    from lmcache_disagg.transfer.sender import PushHandle

__all__ = ["NixlLink", "NixlReceiveChannel", "NixlSendChannel", "make_agent"]

logger = logging.getLogger(__name__)

_IDLE_PUMP = 0.05
# While WRITEs are in flight, how long the data thread waits for more work before it polls them.
_NIXL_POLL = 0.0002
_MAX_AGENT_NAME = 256


def make_agent(
    prefix: str, backends: Sequence[str], progress_thread: bool, pages: torch.Tensor
) -> NixlAgent:
    """A NIXL agent with ``pages`` registered (raises whatever NIXL raises)."""
    agent = NixlAgent(f"{prefix}-{secrets.token_hex(6)}", backends, progress_thread)
    agent.register(pages)
    return agent


# -- P side ------------------------------------------------------------------------------------


class NixlSendChannel(SendChannel):
    name: ClassVar[str] = "nixl"

    def __init__(self, agent: NixlAgent, page_bytes: int, remote_page_bytes: int) -> None:
        self._agent = agent
        self._page_bytes = page_bytes
        self._remote_page_bytes = remote_page_bytes

    def offer(self) -> bytes:
        return encode_params(NixlHello(self._agent.name, self._agent.metadata()))

    def connect(self, host: str, session: bytes, params: bytes, target: str) -> SendLink:
        try:
            accept = decode_params(params, NixlAccept)
            remote = self._agent.add_remote(accept.metadata)
        except Exception as exc:
            raise PeerUnreachable(f"NIXL handshake with {target} failed: {exc}") from exc
        return NixlLink(
            self._agent, remote, accept, self._page_bytes, self._remote_page_bytes, target
        )

    def close(self) -> None:
        self._agent.close()


class NixlLink(SendLink):
    name: ClassVar[str] = "nixl"

    def __init__(
        self,
        agent: NixlAgent,
        remote: str,
        accept: NixlAccept,
        page_bytes: int,
        remote_page_bytes: int,
        target: str,
    ) -> None:
        self._agent = agent
        self._remote = remote
        self._accept = accept
        self._page_bytes = page_bytes
        self._remote_page_bytes = remote_page_bytes
        self._target = target

    def pump(self, host: PumpHost, stop: threading.Event) -> None:
        agent = self._agent
        page_bytes = self._page_bytes
        remote_page_bytes = self._remote_page_bytes
        pool_base = self._accept.pool_base
        remote_mem = self._accept.mem
        remote_dev = self._accept.dev
        # Oldest first. WRITEs to one peer complete in posting order in practice, so reaping
        # stops at the first one still running: O(1) per posted chunk instead of a scan of the
        # whole window (up to the send pool's page count) after every post.
        inflight: collections.deque[tuple[Any, SendPage, PushHandle, int]] = collections.deque()
        finishing: list[PushHandle] = []
        metrics = host.metrics

        def reap() -> None:
            done_pages: list[SendPage] = []
            done_bytes = done_chunks = 0
            broken = False
            try:
                while inflight:
                    xfer, page, handle, nbytes = inflight[0]
                    state = agent.check(xfer)
                    if state == "PROC":
                        break
                    inflight.popleft()
                    agent.release_xfer(xfer)
                    done_pages.append(page)
                    if state == "DONE":
                        done_chunks += 1
                        done_bytes += nbytes
                    else:
                        handle.fail("nixl_error")
                        broken = True
            finally:
                if done_pages:
                    # Only now, with the WRITE finished, may the producer reuse the page.
                    host.release_pages(done_pages)
                    if done_chunks:
                        metrics.chunks_total.inc(done_chunks)
                        metrics.bytes_total.inc(done_bytes)
            if broken:
                raise PeerClosed(f"NIXL transfer to {self._target} failed")
            if finishing:
                busy = {id(h) for _, _, h, _ in inflight}
                for handle in list(finishing):
                    if id(handle) not in busy:
                        finishing.remove(handle)
                        host.send_finish(handle)

        try:
            while True:
                if host.broken:
                    return
                item = host.next_item_nowait()
                if item is None:
                    if inflight or finishing:
                        reap()
                    item = host.next_item(_NIXL_POLL if inflight else _IDLE_PUMP)
                    if item is None:
                        continue
                if isinstance(item, StopItem):
                    return
                if isinstance(item, FinishItem):
                    finishing.append(item.handle)
                    reap()
                    continue
                assert isinstance(item, ChunkItem)
                handle, index, page, nbytes = item.handle, item.index, item.page, item.nbytes
                if not handle.pending:
                    host.release_pages([page])
                    continue
                key = item.key
                notif = NIXL_NOTIF.pack(
                    b"K", handle.handle, index, nbytes, item.num_tokens, len(key)
                )
                remote_addr = pool_base + handle.pages[index] * remote_page_bytes
                try:
                    xfer = agent.write(
                        local_addr=agent.local_base + page.index * page_bytes,
                        remote_addr=remote_addr,
                        nbytes=nbytes,
                        remote_agent=self._remote,
                        remote_mem=remote_mem,
                        remote_dev=remote_dev,
                        notif=notif + key,
                    )
                except Exception as exc:
                    host.release_pages([page])
                    raise PeerClosed(f"NIXL WRITE to {self._target} failed: {exc}") from exc
                inflight.append((xfer, page, handle, nbytes))
                # Over shared memory UCX usually finishes the copy inside transfer(): hand the
                # page back to the producer now rather than after the next queue wait.
                reap()
        finally:
            for xfer, page, handle, _nbytes in inflight:
                agent.release_xfer(xfer)
                host.release_pages([page])
                handle.fail("peer_closed")

    def close(self) -> None:
        if self._remote:
            try:
                self._agent.remove_remote(self._remote)
            except Exception as exc:
                logger.debug("NIXL remove_remote(%s) failed: %s", self._remote, exc)
            self._remote = ""


# -- D side ------------------------------------------------------------------------------------


class NixlReceiveChannel(ReceiveChannel):
    name: ClassVar[str] = "nixl"
    fenced: ClassVar[bool] = False

    def __init__(self, agent: NixlAgent) -> None:
        self._agent = agent
        self._lock = threading.Lock()
        # agent name -> session, oldest first (bounded like the session table itself)
        self._sessions: collections.OrderedDict[str, Session] = collections.OrderedDict()
        self._sink: ChunkSink | None = None

    def start(self, sink: ChunkSink, stop: threading.Event) -> None:
        self._sink = sink

    def accept(self, session: Session, params: bytes) -> bytes | None:
        try:
            hello = decode_params(params, NixlHello)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None
        if not hello.agent or len(hello.agent) > _MAX_AGENT_NAME:
            return None
        if hello.metadata:
            try:
                self._agent.add_remote(hello.metadata)
            except Exception as exc:
                logger.info("cannot load sender's NIXL metadata (%s); offering TCP only", exc)
                return None
        with self._lock:
            self._sessions[hello.agent] = session
            self._sessions.move_to_end(hello.agent)
            while len(self._sessions) > MAX_SESSIONS + MAX_HALF_OPEN:
                self._sessions.popitem(last=False)
        agent = self._agent
        return encode_params(
            NixlAccept(
                agent=agent.name,
                metadata=agent.metadata(),
                pool_base=agent.base_address,
                mem=agent.mem_type,
                dev=agent.device_id,
            )
        )

    def forget(self, session: Session) -> None:
        with self._lock:
            for name in [n for n, s in self._sessions.items() if s is session]:
                del self._sessions[name]

    def busy(self) -> bool:
        return bool(self._sessions)

    def poll(self) -> None:
        sink = self._sink
        if sink is None or not self._sessions:
            return
        for agent_name, messages in self._agent.get_new_notifs().items():
            with self._lock:
                session = self._sessions.get(agent_name)
            for message in messages:
                if session is None or not session.authed or not sink.live(session):
                    sink.metrics.failure("auth")
                    continue
                try:
                    self._on_notif(sink, session, message)
                except ProtocolViolation as exc:
                    logger.warning("bad NIXL notification from %s: %s", agent_name, exc)
                    sink.metrics.failure("protocol")

    @staticmethod
    def _on_notif(sink: ChunkSink, session: Session, message: bytes) -> None:
        if len(message) < NIXL_NOTIF.size:
            raise ProtocolViolation("short notification")
        tag, handle, index, nbytes, num_tokens, key_len = NIXL_NOTIF.unpack_from(message)
        if tag != b"K" or key_len > MAX_KEY_BYTES or len(message) != NIXL_NOTIF.size + key_len:
            raise ProtocolViolation("malformed notification")
        key = bytes(message[NIXL_NOTIF.size :])
        begun = sink.begin_chunk(session, handle, index, nbytes, num_tokens)
        if isinstance(begun, str):
            sink.metrics.failure(begun)
            return
        sink.end_chunk(begun, nbytes, num_tokens, key, "")

    def shutdown(self) -> None:
        self._agent.close()
