"""The channel interface: how chunk bytes get from P's staging pages into D's reserved pages.

A channel module (``tcp``, ``nixl``) provides two classes behind the interfaces below:

* P side: a :class:`SendChannel` (one per :class:`~lmcache_disagg.transfer.sender.KVSender`) offers
  itself in the hello (:meth:`SendChannel.offer`) and, when D accepted it, :meth:`SendChannel.connect`
  builds a :class:`SendLink` for that peer. The link's :meth:`SendLink.pump` runs on the peer's data
  thread and drains the peer's queue of :data:`SendItem` (it owns the send path end to end).
* D side: a :class:`ReceiveChannel` (one per receiver) answers offers in the hello
  (:meth:`ReceiveChannel.accept`), runs its own receive path (threads, or :meth:`ReceiveChannel.poll`
  on D's control thread) and reports chunks through the :class:`ChunkSink` the receiver passes it.

The coordinators (sender, receiver) never look at a channel's name to decide anything.
"""

from __future__ import annotations

import abc
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Final, Protocol

from lmcache_disagg.transfer.metrics import TransferMetrics
from lmcache_disagg.transfer.pool import SendPage
from lmcache_disagg.transfer.session import Session

if TYPE_CHECKING:
    from lmcache_disagg.transfer.receiver import ChunkTarget
    from lmcache_disagg.transfer.sender import PushHandle

__all__ = [
    "STOP",
    "ChunkItem",
    "ChunkSink",
    "FinishItem",
    "PumpHost",
    "ReceiveChannel",
    "SendChannel",
    "SendItem",
    "SendLink",
    "StopItem",
]


# -- P side: what a peer's data thread consumes --------------------------------------------------


@dataclass(slots=True, eq=False)
class ChunkItem:
    """Send ``page.data[:nbytes]`` as chunk ``index`` of ``handle``."""

    handle: PushHandle
    index: int
    page: SendPage
    nbytes: int
    num_tokens: int
    key: bytes


@dataclass(slots=True, eq=False)
class FinishItem:
    """Tell D the writes of ``handle`` ended (after every earlier chunk item left)."""

    handle: PushHandle


@dataclass(slots=True, frozen=True)
class StopItem:
    """The peer is closing: the pump returns."""


STOP: Final = StopItem()

SendItem = ChunkItem | FinishItem | StopItem


class PumpHost(Protocol):
    """What a :class:`SendLink` pump needs from its peer (``transfer.sender``'s peer object)."""

    @property
    def target(self) -> str: ...

    @property
    def broken(self) -> str: ...

    @property
    def metrics(self) -> TransferMetrics: ...

    def next_item(self, timeout: float) -> SendItem | None:
        """The next item within ``timeout`` (None: nothing yet); STOP when stopping or broken."""
        ...

    def next_item_nowait(self) -> SendItem | None: ...

    def send_finish(self, handle: PushHandle) -> None:
        """Send the finish notice of ``handle`` over the control plane (fire and forget)."""
        ...

    def release_pages(self, pages: list[SendPage]) -> None: ...


class SendLink(abc.ABC):
    """One peer's data path over one channel (built by :meth:`SendChannel.connect`)."""

    name: ClassVar[str]

    @abc.abstractmethod
    def pump(self, host: PumpHost, stop: threading.Event) -> None:
        """Drain ``host``'s items until STOP. Returns every page it took (sent or not); raises
        :class:`~lmcache_disagg.transfer.errors.TransferError` when the path broke."""

    def alive(self) -> bool:
        """False once the path is known to be gone (cheap; called before reusing a peer)."""
        return True

    def interrupt(self) -> None:  # noqa: B027 - optional hook
        """Make a blocked pump return soon (the peer broke). Any thread."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the link's resources (after the pump returned)."""


class SendChannel(abc.ABC):
    """One channel kind on P (one instance per sender)."""

    name: ClassVar[str]

    def offer(self) -> bytes:
        """This channel's parameters for the hello (``ChannelOffer.params``)."""
        return b""

    @abc.abstractmethod
    def connect(self, host: str, session: bytes, params: bytes, target: str) -> SendLink:
        """A link to the peer at ``host`` that accepted with ``params``; raises TransferError."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the channel's resources (sender shutdown)."""


# -- D side ----------------------------------------------------------------------------------------


class ChunkSink(Protocol):
    """What a :class:`ReceiveChannel` reports to (the receiver)."""

    @property
    def metrics(self) -> TransferMetrics: ...

    def data_session(self, sid: bytes) -> Session:
        """The authenticated, non-probe session ``sid``; raises TransferError otherwise."""
        ...

    def live(self, session: Session) -> bool:
        """Whether ``session`` is still in the session table."""
        ...

    def begin_chunk(
        self, session: Session, handle: int, index: int, nbytes: int, num_tokens: int
    ) -> ChunkTarget | str:
        """Validate a chunk's addressing; a :class:`ChunkTarget` to write into, or the reason
        to drop the chunk. Raises ProtocolViolation when the peer can no longer be trusted."""
        ...

    def end_chunk(
        self, target: ChunkTarget, nbytes: int, num_tokens: int, key: bytes, error: str
    ) -> None:
        """Commit (``error`` == "") or fail a chunk begun with :meth:`begin_chunk`."""
        ...


class ReceiveChannel(abc.ABC):
    """One channel kind on D (one instance per receiver)."""

    name: ClassVar[str]
    fenced: ClassVar[bool]
    """True when D decides when bytes land (TCP reads); False when a peer writes into the pool
    directly (NIXL/RDMA), so the pages of an unfinished transfer are quarantined after it ends."""

    @abc.abstractmethod
    def start(self, sink: ChunkSink, stop: threading.Event) -> None:
        """Start the receive path (threads named ``lmcd-rx-*`` that stop with ``stop``)."""

    @abc.abstractmethod
    def accept(self, session: Session, params: bytes) -> bytes | None:
        """Answer P's offer of this channel: D's parameters, or None to decline."""

    @property
    def data_port(self) -> int:
        """The TCP port this channel listens on (0: none)."""
        return 0

    def busy(self) -> bool:
        """True while :meth:`poll` has work to look for (the control thread polls faster)."""
        return False

    def poll(self) -> None:  # noqa: B027 - optional hook
        """Called on D's control thread every loop (channels without threads of their own)."""

    def forget(self, session: Session) -> None:  # noqa: B027 - optional hook
        """``session`` left the session table."""

    @abc.abstractmethod
    def shutdown(self) -> None:
        """Stop and join the receive path; idempotent."""
