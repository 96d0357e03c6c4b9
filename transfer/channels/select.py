"""Which channels an endpoint runs, from ``config.channel`` (auto, nixl, tcp).

The only place that knows the channel names; the sender and receiver get ordered lists.
"""

from __future__ import annotations

import logging
import threading

from lmcache_disagg.config import LMCacheDisaggConfig
from lmcache_disagg.transfer.channels.base import ReceiveChannel, SendChannel
from lmcache_disagg.transfer.channels.tcp import TcpReceiveChannel, TcpSendChannel
from lmcache_disagg.transfer.errors import TransferError
from lmcache_disagg.transfer.pool import ReceivePool, SendPool

__all__ = ["receive_channels", "send_channels"]

logger = logging.getLogger(__name__)


def send_channels(
    config: LMCacheDisaggConfig,
    send_pool: SendPool,
    remote_page_bytes: int,
    stopping: threading.Event,
) -> list[SendChannel]:
    """P's channels, most preferred first. Raises TransferError when ``channel: nixl`` and NIXL
    cannot start."""
    channels: list[SendChannel] = []
    if config.channel in ("auto", "nixl"):
        try:
            from lmcache_disagg.transfer.channels.nixl import NixlSendChannel, make_agent

            agent = make_agent(
                "lmcd-tx", config.nixl_backends, config.nixl_progress_thread, send_pool.pages
            )
            channels.append(NixlSendChannel(agent, send_pool.page_bytes, remote_page_bytes))
        except Exception as exc:
            if config.channel == "nixl":
                raise TransferError(f"channel nixl requested but NIXL failed: {exc}") from exc
            logger.info("NIXL unavailable (%s); pushing over TCP", exc)
    if config.channel in ("auto", "tcp"):
        channels.append(
            TcpSendChannel(send_pool, config.connect_timeout, config.handshake_timeout, stopping)
        )
    return channels


def receive_channels(
    config: LMCacheDisaggConfig, pool: ReceivePool, host: str
) -> list[ReceiveChannel]:
    """D's channels, most capable first (TCP whenever the pool is in host memory). Raises
    TransferError when a listener cannot bind or ``channel: nixl`` and NIXL cannot start."""
    tcp: TcpReceiveChannel | None = None
    if pool.view is not None:
        # Bound before NIXL starts, so a busy data port is a clear start error.
        tcp = TcpReceiveChannel(
            pool, host, config.data_port, config.advertised_data_port, config.handshake_timeout
        )
    channels: list[ReceiveChannel] = []
    if config.channel in ("auto", "nixl"):
        try:
            from lmcache_disagg.transfer.channels.nixl import NixlReceiveChannel, make_agent

            agent = make_agent(
                "lmcd-rx", config.nixl_backends, config.nixl_progress_thread, pool.pages
            )
            channels.append(NixlReceiveChannel(agent))
        except Exception as exc:
            if config.channel == "nixl":
                if tcp is not None:
                    tcp.shutdown()
                raise TransferError(f"channel nixl requested but NIXL failed: {exc}") from exc
            logger.info("NIXL unavailable (%s); receiving over TCP only", exc)
    if tcp is not None:
        channels.append(tcp)
    return channels
