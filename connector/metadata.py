"""Scheduler -> worker data for one engine step (plain dataclasses, picklable, torch-free).

vLLM builds one :class:`LMCacheDisaggMetadata` per step with
:meth:`LMCacheDisaggConnector.build_connector_meta` and hands the same object to every worker
(TP rank) before the forward. Ranks apply rank-specific details themselves: the push target port
(+ tp_rank) and the chunk keys (the fingerprint carries the rank).

Deadlines are not sent: each worker starts its own clock when it first sees an entry, because the
scheduler and the workers may be different processes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

__all__ = [
    "CacheLoad",
    "LMCacheDisaggMetadata",
    "LoadSpec",
    "PushProgress",
    "PushStart",
    "StoreProgress",
]


@dataclass
class PushStart:
    """P: a new request whose prompt KV is to be pushed (sent once, in its first step)."""

    req_id: str
    transfer_id: str
    target: str
    """D's KV endpoint as the proxy gave it (rank 0); rank i pushes to port + i."""
    token_ids: list[int]
    """The tokens whose KV is pushed: the prompt without its last token (D computes that one)."""


@dataclass
class PushProgress:
    """P: after this step's forward, tokens ``[0, computed_end)`` of ``req_id`` are in its blocks.

    ``computed_end == 0`` with no blocks means the request was preempted: chunks not yet gathered
    must wait for the recompute.
    """

    req_id: str
    block_ids: list[int]
    computed_end: int


@dataclass
class LoadSpec:
    """D: load tokens ``[load_start, load_end)`` of transfer ``transfer_id`` into ``block_ids``.

    ``token_ids`` are D's own prompt tokens ``[0, load_end)``; the worker recomputes the chunk keys
    from them and refuses chunks whose header key differs. ``num_pushed`` is how many tokens P
    pushed (it fixes the chunk count and the partial last chunk's size).
    """

    req_id: str
    transfer_id: str
    block_ids: list[int]
    load_start: int
    load_end: int
    num_pushed: int
    token_ids: list[int]


@dataclass
class CacheLoad:
    """Load tokens ``[load_start, load_end)`` of ``req_id`` from the chunk store into ``block_ids``.

    The hit was found and pinned by this rank's lookup under ``lease_id``; the worker fetches it,
    scatters it and releases the lease (on success and on every failure).
    """

    req_id: str
    lease_id: str
    block_ids: list[int]
    load_start: int
    load_end: int


@dataclass
class StoreProgress:
    """After this step's forward, tokens ``[0, computed_end)`` of ``req_id`` are in ``block_ids``.

    ``new_token_ids`` extend the token ids sent in earlier steps (the prompt in the first one,
    then decoded tokens when ``save_decode_cache`` is on). ``prompt_len`` tells the worker where
    the prompt ends (its partial last chunk is stored once computed); ``final`` ends the tracking.
    """

    req_id: str
    new_token_ids: list[int]
    block_ids: list[int]
    computed_end: int
    prompt_len: int
    final: bool = False


@dataclass
class LMCacheDisaggMetadata(KVConnectorMetadata):
    """Everything the workers need to act on in one step (each list usually tiny or empty)."""

    push_starts: list[PushStart] = field(default_factory=list)
    push_progress: list[PushProgress] = field(default_factory=list)
    push_finished: list[str] = field(default_factory=list)
    """Requests whose blocks P's scheduler left alive for us; report them in finished_sending."""
    push_cancelled: list[str] = field(default_factory=list)
    """Requests that ended before their prefill completed (aborted): cancel the push."""
    loads: list[LoadSpec] = field(default_factory=list)
    releases: list[str] = field(default_factory=list)
    """Transfer ids D will never load (request finished first, or nothing to load): free them."""
    step_has_work: bool = True
    """False for steps that schedule no tokens (the worker may then wait briefly for transfers)."""
    cache_loads: list[CacheLoad] = field(default_factory=list)
    cache_releases: list[str] = field(default_factory=list)
    """Leases of lookups that will not be loaded (request scheduled without them, or finished)."""
    store_progress: list[StoreProgress] = field(default_factory=list)
    store_dropped: list[str] = field(default_factory=list)
    """Requests whose storing ends (finished or aborted): forget their state."""

    def is_empty(self) -> bool:
        return not (
            self.push_starts
            or self.push_progress
            or self.push_finished
            or self.push_cancelled
            or self.loads
            or self.releases
            or self.cache_loads
            or self.cache_releases
            or self.store_dropped
        )
