"""Thin wrapper over ``nixl._api.nixl_agent`` (imported lazily: constructing one imports NIXL).

One agent per :class:`KVSender`/:class:`KVReceiver`; it registers that endpoint's pool tensor once.
The sender's data thread calls :meth:`write`/:meth:`check`/:meth:`release_xfer`; the receiver's control
thread calls :meth:`get_new_notifs`. NIXL errors surface as the library's exceptions and are
translated by the callers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["NixlAgent"]


class NixlAgent:
    def __init__(self, name: str, backends: Sequence[str], progress_thread: bool = False) -> None:
        """``progress_thread``: NIXL's own; without it the caller's check/notification polls
        make progress (see ``LMCacheDisaggConfig.nixl_progress_thread``)."""
        from nixl._api import nixl_agent, nixl_agent_config

        self.name = name
        config = nixl_agent_config(enable_prog_thread=progress_thread, backends=list(backends))
        self._agent: Any = nixl_agent(name, config)
        self._registered: Any = None
        self.local_base = 0
        self.base_address = 0
        self.mem_type = "DRAM"
        self.device_id = 0

    def register(self, pages: torch.Tensor) -> None:
        """Register the endpoint's whole pool once (DRAM for host tensors, VRAM for CUDA)."""
        self._registered = self._agent.register_memory(pages)
        self.local_base = self.base_address = pages.data_ptr()
        if pages.device.type == "cuda":
            self.mem_type = "VRAM"
            self.device_id = pages.device.index or 0

    def metadata(self) -> bytes:
        return bytes(self._agent.get_agent_metadata())

    def add_remote(self, metadata: bytes) -> str:
        name = self._agent.add_remote_agent(metadata)
        return name.decode() if isinstance(name, bytes) else str(name)

    def remove_remote(self, name: str) -> None:
        self._agent.remove_remote_agent(name)

    def write(
        self,
        *,
        local_addr: int,
        remote_addr: int,
        nbytes: int,
        remote_agent: str,
        remote_mem: str,
        remote_dev: int,
        notif: bytes,
    ) -> Any:
        """Start one WRITE of ``nbytes`` with a notification; returns the transfer handle."""
        local = self._agent.get_xfer_descs([(local_addr, nbytes, self.device_id)], self.mem_type)
        remote = self._agent.get_xfer_descs([(remote_addr, nbytes, remote_dev)], remote_mem)
        handle = self._agent.initialize_xfer("WRITE", local, remote, remote_agent, notif)
        state = self._agent.transfer(handle)
        if state == "ERR":
            self._agent.release_xfer_handle(handle)
            raise RuntimeError("NIXL transfer could not be posted")
        return handle

    def check(self, handle: Any) -> str:
        """One of "DONE", "PROC", "ERR" (NIXL errors such as a remote disconnect are "ERR")."""
        try:
            return str(self._agent.check_xfer_state(handle))
        except Exception:
            return "ERR"

    def release_xfer(self, handle: Any) -> None:
        """Best effort: a handle of a failed transfer may refuse to be released."""
        with contextlib.suppress(Exception):
            self._agent.release_xfer_handle(handle)

    def get_new_notifs(self) -> dict[str, list[bytes]]:
        notifs = self._agent.get_new_notifs()
        return {
            (k.decode() if isinstance(k, bytes) else str(k)): [bytes(m) for m in v]
            for k, v in notifs.items()
        }

    def close(self) -> None:
        if self._registered is not None:
            try:
                self._agent.deregister_memory(self._registered)
            finally:
                self._registered = None
