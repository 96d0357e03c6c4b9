"""The ``cache_aware`` routing policy: send a request where its KV already is (pure logic).

Inputs are the prompt's token ids, the candidate workers' outstanding tokens, and the
:class:`~lmcache_disagg.proxy.kvindex.KVIndex`. The prompt is hashed into chunk keys once per
distinct worker fingerprint (the same seeded chain the workers use, :mod:`lmcache_disagg.keys`),
and each candidate's predicted hit is its longest run of leading keys in the index.

**Choosing a worker** (D first, then P the same way by what P holds):

* cost = uncached prompt tokens on that worker + ``load_weight`` x its outstanding tokens; the
  cheapest eligible worker wins;
* ties go to more cached tokens, then fewer outstanding tokens, then the highest rendezvous hash of
  the prompt's last chunk key and the worker's name (stable for one prompt, uniform over prompts);
* **imbalance bound:** a worker is eligible only while its outstanding tokens are at most
  ``imbalance_ratio`` x the least loaded candidate's plus ``imbalance_slack_tokens``. A hot prefix
  therefore fills one worker only up to that bound, then spills to the next best, which then caches
  the prefix too.

**Conditional disaggregation:** when the chosen D lacks at most ``skip_prefill_chunks`` chunks of
the prompt (the prefix it holds is all but a few chunks), P is skipped and D computes the rest
itself; ``None`` never skips. Every decision is counted by reason in :class:`DecisionCounts`.

A stale index (a worker evicted a chunk the index still lists) only costs speed: the worker's own
store decides what it loads and recomputes the rest.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import xxhash

from lmcache_disagg.keys import chain_root, chunk_keys
from lmcache_disagg.proxy.kvindex import KVIndex
from lmcache_disagg.transfer.protocol import LayoutFingerprint

__all__ = [
    "CacheAwarePolicy",
    "CacheAwareSettings",
    "Candidate",
    "Choice",
    "DecisionCounts",
    "Plan",
    "PlanReason",
    "choose",
]

PlanReason = Literal["disaggregated", "cached_on_decode", "no_prefill_worker"]


@dataclass(frozen=True)
class CacheAwareSettings:
    load_weight: float = 0.25
    """Cost of one outstanding token on a worker, in uncached prompt tokens. Below 1 because the
    proxy's outstanding tokens include requests that are already decoding, which delay a new
    prefill far less than prefilling the same number of tokens would."""
    imbalance_ratio: float = 2.0
    imbalance_slack_tokens: int = 8192
    skip_prefill_chunks: int | None = 1
    """Skip P when D lacks at most this many chunks of the prompt (None: never)."""

    def validate(self) -> None:
        if not (math.isfinite(self.load_weight) and self.load_weight >= 0):
            raise ValueError("load_weight must be a finite number >= 0")
        if not (math.isfinite(self.imbalance_ratio) and self.imbalance_ratio >= 1):
            raise ValueError("imbalance_ratio must be >= 1")
        if self.imbalance_slack_tokens < 0:
            raise ValueError("imbalance_slack_tokens must be >= 0")
        if self.skip_prefill_chunks is not None and self.skip_prefill_chunks < 0:
            raise ValueError("skip_prefill_chunks must be >= 0 (or None to never skip P)")


@dataclass(frozen=True)
class Candidate:
    name: str
    outstanding_tokens: int
    cached_tokens: int = 0


@dataclass(frozen=True)
class Choice:
    name: str
    cached_tokens: int


def choose(
    candidates: Sequence[Candidate],
    prompt_tokens: int,
    settings: CacheAwareSettings,
    tie_key: bytes = b"",
) -> Choice | None:
    """The cheapest eligible candidate (see the module docstring), or None if there is none."""
    if not candidates:
        return None
    floor = min(c.outstanding_tokens for c in candidates)
    limit = floor * settings.imbalance_ratio + settings.imbalance_slack_tokens
    eligible = [c for c in candidates if c.outstanding_tokens <= limit]

    def rank(c: Candidate) -> tuple[float, int, int, int]:
        uncached = max(prompt_tokens - c.cached_tokens, 0)
        cost = uncached + settings.load_weight * c.outstanding_tokens
        spread = xxhash.xxh64_intdigest(tie_key, seed=xxhash.xxh64_intdigest(c.name.encode()))
        return (cost, -c.cached_tokens, c.outstanding_tokens, -spread)

    best = min(eligible, key=rank)
    return Choice(best.name, best.cached_tokens)


@dataclass
class DecisionCounts:
    by_reason: Counter[str] = field(default_factory=Counter)
    predicted_hit_tokens: int = 0
    requests: int = 0


@dataclass(frozen=True)
class Plan:
    decode: str
    prefill: str | None
    """None: D computes the whole prompt itself (see ``reason``)."""
    reason: PlanReason
    predicted_decode_hit_tokens: int
    predicted_prefill_hit_tokens: int


class _Hashed:
    """A prompt's chunk keys per fingerprint, computed on first use."""

    def __init__(self, token_ids: Sequence[int]) -> None:
        self.token_ids = token_ids
        self._by_fp: dict[LayoutFingerprint, list[bytes]] = {}

    def keys(self, fingerprint: LayoutFingerprint) -> list[bytes]:
        keys = self._by_fp.get(fingerprint)
        if keys is None:
            keys = chunk_keys(chain_root(fingerprint), self.token_ids, fingerprint.chunk_size)
            self._by_fp[fingerprint] = keys
        return keys


class CacheAwarePolicy:
    """Plans (D, P) for one request from the index. Called from the proxy's event loop thread."""

    def __init__(self, index: KVIndex, settings: CacheAwareSettings | None = None) -> None:
        self.settings = settings or CacheAwareSettings()
        self.settings.validate()
        self.index = index
        self.counts = DecisionCounts()
        self._last: _Hashed | None = None

    def cached_tokens(self, worker: str, token_ids: Sequence[int]) -> int:
        """Predicted leading cached tokens of ``token_ids`` on ``worker`` (0 if unknown)."""
        return self._cached(worker, _Hashed(token_ids), self.index.fingerprints())

    def choose_worker(
        self, token_ids: Sequence[int], candidates: Sequence[tuple[str, int]]
    ) -> Choice | None:
        """The worker for ``token_ids`` among ``(name, outstanding_tokens)`` (one role).

        The prompt's keys are kept from the previous call when it passed the same list object
        (D, then P, then retries of one request hash it once)."""
        hashed = self._last
        if hashed is None or hashed.token_ids is not token_ids:
            hashed = self._last = _Hashed(token_ids)
        return self._choose(hashed, self.index.fingerprints(), candidates)

    def prefill_decision(
        self, token_ids: Sequence[int], decode: Choice, has_prefill: bool = True
    ) -> PlanReason:
        """Conditional disaggregation for a chosen D; counts the decision by reason."""
        reason: PlanReason = "disaggregated" if has_prefill else "no_prefill_worker"
        threshold = self.settings.skip_prefill_chunks
        if threshold is not None and decode.cached_tokens > 0:
            chunk = self._chunk_size(decode.name, self.index.fingerprints())
            missing_chunks = math.ceil(max(len(token_ids) - decode.cached_tokens, 0) / chunk)
            if missing_chunks <= threshold:
                reason = "cached_on_decode"
        self.counts.by_reason[reason] += 1
        return reason

    def plan(
        self,
        token_ids: Sequence[int],
        decode: Sequence[tuple[str, int]],
        prefill: Sequence[tuple[str, int]],
    ) -> Plan | None:
        """Pick D among ``decode`` and P among ``prefill`` (``(name, outstanding_tokens)``).

        Returns None when there is no decode candidate.
        """
        hashed = _Hashed(token_ids)
        fingerprints = self.index.fingerprints()
        d = self._choose(hashed, fingerprints, decode)
        if d is None:
            return None
        self.counts.requests += 1
        self.counts.predicted_hit_tokens += d.cached_tokens
        reason = self.prefill_decision(token_ids, d, has_prefill=bool(prefill))
        p = None
        if reason == "disaggregated":
            p = self._choose(hashed, fingerprints, prefill)
        return Plan(
            d.name,
            p.name if p is not None else None,
            reason,
            d.cached_tokens,
            p.cached_tokens if p is not None else 0,
        )

    def _choose(
        self,
        hashed: _Hashed,
        fingerprints: Mapping[str, LayoutFingerprint],
        candidates: Sequence[tuple[str, int]],
    ) -> Choice | None:
        cands = [
            Candidate(w, load, self._cached(w, hashed, fingerprints)) for w, load in candidates
        ]
        return choose(cands, len(hashed.token_ids), self.settings, _tie_key(hashed, fingerprints))

    def _cached(
        self, worker: str, hashed: _Hashed, fingerprints: Mapping[str, LayoutFingerprint]
    ) -> int:
        fingerprint = fingerprints.get(worker)
        if fingerprint is None or not hashed.token_ids:
            return 0
        keys = hashed.keys(fingerprint)
        chunks = self.index.prefix_chunks(worker, keys)
        return min(chunks * fingerprint.chunk_size, len(hashed.token_ids))

    @staticmethod
    def _chunk_size(worker: str, fingerprints: Mapping[str, LayoutFingerprint]) -> int:
        fingerprint = fingerprints.get(worker)
        return fingerprint.chunk_size if fingerprint is not None else 256


def _tie_key(hashed: _Hashed, fingerprints: Mapping[str, LayoutFingerprint]) -> bytes:
    """The prompt's last chunk key under the first known fingerprint (b"" when none is known)."""
    for fingerprint in fingerprints.values():
        keys = hashed.keys(fingerprint)
        return keys[-1] if keys else b""
    return b""
