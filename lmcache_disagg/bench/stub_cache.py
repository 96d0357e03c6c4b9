"""A stub worker's chunk cache: real chunk keys and real KV events, no KV (test and bench tooling).

With ``--kv-events tcp://HOST:PORT --tokenizer DIR`` a stub worker tokenizes each request the way
the proxy does (:class:`~lmcache_disagg.proxy.tokenizer.PromptTokenizer`), keys the prompt with
the real chain (:mod:`lmcache_disagg.keys`) under :data:`STUB_FINGERPRINT`, counts its leading
hits in an LRU of ``capacity`` chunk keys (reported as ``cached_tokens``), stores the prompt's keys
and publishes what it stored and evicted through a real
:class:`~lmcache_disagg.transfer.event_publisher.KVEventPublisher`. :meth:`StubCache.forget`
empties the cache *without* publishing, which makes the proxy's index stale on purpose.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lmcache_disagg.keys import chain_root, chunk_keys
from lmcache_disagg.proxy.tokenizer import PromptTokenizer
from lmcache_disagg.transfer.event_publisher import KVEventPublisher, PublisherSettings
from lmcache_disagg.transfer.protocol import LayoutFingerprint

__all__ = ["STUB_FINGERPRINT", "StubCache", "StubHit"]

STUB_FINGERPRINT = LayoutFingerprint(
    model="stub-model", dtype="bfloat16", num_layers=2, num_kv_heads=2, head_dim=64,
    chunk_size=16, tp_rank=0, tp_size=1,
)  # fmt: skip


@dataclass(frozen=True)
class StubHit:
    cached_tokens: int
    """Leading prompt tokens found in the cache (whole chunks, capped at the prompt)."""
    prompt_tokens: int


class StubCache:
    def __init__(
        self, endpoint: str, tokenizer_dir: str, capacity: int = 4096, publisher_id: str = "stub"
    ) -> None:
        self._tokenizer = PromptTokenizer.from_dir(tokenizer_dir)
        self._root = chain_root(STUB_FINGERPRINT)
        self._capacity = capacity
        self._keys: OrderedDict[bytes, None] = OrderedDict()
        self.publisher = KVEventPublisher(
            PublisherSettings(endpoint, batch_interval=0.005, heartbeat_interval=0.2),
            STUB_FINGERPRINT,
            publisher_id=publisher_id,
        )

    def start(self) -> None:
        self.publisher.start()

    def close(self) -> None:
        self.publisher.close()

    def _lookup(self, body: Mapping[str, Any]) -> tuple[list[bytes], StubHit] | None:
        ids = self._tokenizer.request_tokens(body)
        if not ids:
            return None
        keys = chunk_keys(self._root, ids, STUB_FINGERPRINT.chunk_size)
        hit = 0
        for key in keys:
            if key not in self._keys:
                break
            hit += 1
        return keys, StubHit(min(hit * STUB_FINGERPRINT.chunk_size, len(ids)), len(ids))

    def peek(self, body: Mapping[str, Any]) -> StubHit | None:
        """What :meth:`serve` would hit, without touching or storing anything (None: untokenizable)."""
        found = self._lookup(body)
        return found[1] if found is not None else None

    def serve(self, body: Mapping[str, Any]) -> StubHit | None:
        """This request's cached leading tokens (None: not tokenizable); then stores its prompt."""
        found = self._lookup(body)
        if found is None:
            return None
        keys, hit = found
        stored = [key for key in keys if key not in self._keys]
        for key in keys:
            self._keys[key] = None
            self._keys.move_to_end(key)
        evicted = []
        while len(self._keys) > self._capacity:
            evicted.append(self._keys.popitem(last=False)[0])
        if evicted:
            self.publisher.evicted(evicted, "l1")
        stored = [key for key in stored if key in self._keys]
        if stored:
            self.publisher.stored(stored, "l1")
        return hit

    def forget(self) -> int:
        """Drop every key without telling anyone (a stale index for tests); returns how many."""
        count = len(self._keys)
        self._keys.clear()
        return count
