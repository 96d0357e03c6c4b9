"""Factories for the connector's unit tests: fake vLLM requests/scheduler outputs, CPU caches."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import torch

from lmcache_disagg.connector.keys import chain_root, chunk_keys
from lmcache_disagg.connector.kvcache import WorkerKV
from lmcache_disagg.kernels import KVLayout, gather
from lmcache_disagg.kv_params import DO_REMOTE_DECODE, PUSH_TARGET, TRANSFER_ID
from lmcache_disagg.transfer.protocol import LayoutFingerprint

CHUNK = 16
BLOCK = 8


class Status(enum.Enum):
    RUNNING = 0
    FINISHED_STOPPED = 1
    FINISHED_LENGTH_CAPPED = 2
    FINISHED_ABORTED = 3
    WAITING_FOR_REMOTE_KVS = 4


@dataclass
class FakeRequest:
    """The attributes of ``vllm.v1.request.Request`` the connector reads."""

    request_id: str
    prompt_token_ids: list[int]
    kv_transfer_params: dict[str, Any] | None = None
    num_computed_tokens: int = 0
    status: Status = Status.RUNNING


@dataclass
class FakeSchedulerOutput:
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    preempted_req_ids: set[str] = field(default_factory=set)

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())


def p_request(req_id: str, n_tokens: int, target: str = "127.0.0.1:17555") -> FakeRequest:
    return FakeRequest(
        req_id,
        list(range(10, 10 + n_tokens)),
        {DO_REMOTE_DECODE: True, TRANSFER_ID: f"tid-{req_id}", PUSH_TARGET: target},
    )


def make_kv(num_layers: int = 2, num_blocks: int = 64, tp_rank: int = 0, seed: int = 0) -> WorkerKV:
    """CPU caches in vLLM's CPU layout, filled with random values."""
    layout = KVLayout("cpu", BLOCK, 2, 8, torch.float32)
    gen = torch.Generator().manual_seed(seed)
    caches = []
    for _ in range(num_layers):
        cache = layout.empty_cache(num_blocks)
        cache.copy_(torch.randn(cache.shape, generator=gen))
        caches.append(cache)
    fingerprint = LayoutFingerprint(
        model="tiny", dtype="float32", num_layers=num_layers, num_kv_heads=2, head_dim=8,
        chunk_size=CHUNK, tp_rank=tp_rank, tp_size=max(1, tp_rank + 1),
    )  # fmt: skip
    return WorkerKV(caches, layout, fingerprint)


def keys_for(kv: WorkerKV, tokens: list[int]) -> list[bytes]:
    return chunk_keys(chain_root(kv.fingerprint), tokens, kv.fingerprint.chunk_size)


def token_values(kv: WorkerKV, block_ids: list[int], start: int, end: int) -> torch.Tensor:
    """The canonical chunk of tokens [start, end) of every layer (via the kernels' gather)."""
    out = torch.empty(kv.layout.chunk_shape(len(kv.caches), end - start), dtype=kv.layout.dtype)
    gather(kv.caches, kv.layout, torch.tensor(block_ids), start, end, out)
    return out
