"""Describe a worker's vLLM KV caches for the kernels and the transfer layer; TP rank mapping.

Called once per worker from ``register_kv_caches``. The layer order is the model's layer index
(not dict order), so P and D agree on which chunk slice is which layer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from lmcache_disagg.config import LMCacheDisaggConfig, split_host_port
from lmcache_disagg.connector.errors import UnsupportedLayout
from lmcache_disagg.kernels import KVLayout, LayoutError
from lmcache_disagg.transfer.protocol import LayoutFingerprint

__all__ = [
    "WorkerKV",
    "describe_kv_caches",
    "listen_port_for_rank",
    "receiver_config_for_rank",
    "target_for_rank",
]

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class WorkerKV:
    """One worker's KV caches in layer order, their layout and the transfer fingerprint."""

    caches: list[torch.Tensor]
    layout: KVLayout
    fingerprint: LayoutFingerprint

    @property
    def device(self) -> torch.device:
        return self.caches[0].device


def _layer_index(name: str) -> int:
    found = _LAYER_INDEX.findall(f".{name}.")
    if not found:
        raise UnsupportedLayout(f"cannot tell the layer index of KV cache {name!r}")
    return int(found[-1])


def _vllm_cpu_isa(dtype: torch.dtype, block_size: int, head_dim: int) -> str | None:
    """The attention ISA vLLM's CPU backend picks for this cache (None without vLLM's CPU backend)."""
    try:
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa
    except ImportError:
        return None
    return str(_get_attn_isa(dtype, block_size, head_dim))


def _cpu_kind(isa: str | None) -> str:
    """The layout kind of vLLM's CPU KV cache under ``isa`` (see kernels.layouts).

    ``vec``/``vec16`` store K transposed (the ``cpu`` kind), ``amx`` (Intel AMX hosts, bf16,
    block_size % 32 == 0) packs K and V in tiles (``cpu_amx``). Other ISAs (ARM, Power, ...) could
    not be checked, so the connector refuses them and everything is recomputed.
    """
    if isa is None or isa in ("vec", "vec16"):
        return "cpu"
    if isa == "amx":
        return "cpu_amx"
    raise UnsupportedLayout(
        f"vLLM picked the CPU attention ISA {isa!r}, whose KV layout is not supported"
    )


def describe_kv_caches(
    kv_caches: dict[str, torch.Tensor],
    *,
    model: str,
    chunk_size: int,
    tp_rank: int,
    tp_size: int,
    use_mla: bool,
    cpu_isa: str | None = None,
) -> WorkerKV:
    """Order the caches by layer, pick the layout kind and build the fingerprint.

    ``cpu_isa`` is the CPU attention ISA of a CPU cache; by default, the one vLLM picks for it.
    Raises UnsupportedLayout (the connector then stays inactive and everything is recomputed).
    """
    if not kv_caches:
        raise UnsupportedLayout("no KV caches registered")
    ordered = sorted(kv_caches.items(), key=lambda item: _layer_index(item[0]))
    caches = [tensor for _, tensor in ordered]
    if len({t.data_ptr() for t in caches}) != len(caches):
        raise UnsupportedLayout("layers share KV cache tensors (KV sharing is not supported)")
    first = caches[0]
    if use_mla:
        kinds: tuple[str, ...] = ("mla",)
    elif first.device.type == "cpu":
        kinds = ("cpu",)
    else:
        kinds = ("flash_nhd", "flash_hnd")
    layout: KVLayout | None = None
    errors = []
    for kind in kinds:
        try:
            layout = KVLayout.from_cache(kind, first)  # type: ignore[arg-type]
            break
        except LayoutError as exc:
            errors.append(str(exc))
    if layout is None:
        raise UnsupportedLayout("; ".join(errors))
    if layout.kind == "cpu":
        if cpu_isa is None:
            cpu_isa = _vllm_cpu_isa(layout.dtype, layout.block_size, layout.head_dim)
        kind = _cpu_kind(cpu_isa)
        if kind != layout.kind:
            try:
                layout = KVLayout.from_cache(kind, first)  # type: ignore[arg-type]
            except LayoutError as exc:
                raise UnsupportedLayout(str(exc)) from exc
    for tensor in caches[1:]:
        try:
            layout.check_cache(tensor)
        except LayoutError as exc:
            raise UnsupportedLayout(f"layers differ in layout: {exc}") from exc
    fingerprint = LayoutFingerprint(
        model=model,
        dtype=str(layout.dtype).removeprefix("torch."),
        num_layers=len(caches),
        num_kv_heads=layout.num_kv_heads,
        head_dim=layout.head_dim,
        chunk_size=chunk_size,
        tp_rank=tp_rank,
        tp_size=tp_size,
        kv_layout="canonical-mla-v1" if layout.kind == "mla" else "canonical-v1",
    )
    try:
        fingerprint.validate()
    except ValueError as exc:
        raise UnsupportedLayout(str(exc)) from exc
    return WorkerKV(caches, layout, fingerprint)


def target_for_rank(target: str, tp_rank: int) -> str:
    """P rank i pushes to D rank i, which listens on the base port + i (TP equal on both sides)."""
    host, port = split_host_port(target)
    if not 0 < port + tp_rank < 65536:
        raise ValueError(f"push target {target} + rank {tp_rank} is not a valid port")
    host_part = f"[{host}]" if ":" in host else host
    return f"{host_part}:{port + tp_rank}"


def listen_port_for_rank(base_port: int, tp_rank: int) -> int:
    """D rank i listens on ``listen_port + i``; port 0 (pick any) stays 0."""
    if base_port == 0:
        return 0
    if base_port + tp_rank > 65535:
        raise ValueError(f"port {base_port} + rank {tp_rank} is not a valid port")
    return base_port + tp_rank


def receiver_config_for_rank(config: LMCacheDisaggConfig, tp_rank: int) -> LMCacheDisaggConfig:
    """D rank i's receiver config: every fixed port of D (control, data, advertised data) + i.

    All ranks of a TP group share one host and one config, so fixed ports (set for firewalls or
    port forwarding) would otherwise collide; ephemeral ports (0 / None) stay as they are.
    """
    advertised = config.advertised_data_port
    return config.model_copy(
        update={
            "listen_port": listen_port_for_rank(config.listen_port, tp_rank),
            "data_port": listen_port_for_rank(config.data_port, tp_rank),
            "advertised_data_port": (
                None if advertised is None else listen_port_for_rank(advertised, tp_rank)
            ),
        }
    )
