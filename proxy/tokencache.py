"""Incremental tokenization of growing conversations (the proxy's multi-round chat fast path).

Round ``r + 1`` of a chat repeats round ``r``'s messages and adds an answer and a question, so its
rendered prompt usually starts with round ``r``'s rendered prompt. Tokenizing it from scratch costs
time linear in the whole conversation, every round. :class:`ConversationCache` keeps, per
conversation prefix (a digest of its messages), the rendered text, token ids and token start
offsets, and tokenizes only the new tail:

1. find a cached prefix whose text the new text starts with;
2. cut at a clean token boundary ``backoff_chars`` before that prefix's end;
3. **check** that tokenizing the prefix's own text from the cut reproduces its cached tail ids
   (this catches tokenizers whose output depends on where a string starts, e.g. a prepended space);
4. the ids are the prefix's ids before the cut plus the tokenization of the new text from the cut.

When any step fails the text is tokenized whole. Pre-tokenizers split before BPE and never merge
across their pieces, so a cut at a clean boundary with a verified start behaves like the whole
string; the ids are routing hints only, so a rare difference would cost a cache miss on a worker,
never a wrong answer. Bounded by the total number of cached tokens (LRU).
"""

from __future__ import annotations

import threading
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from tokenizers import Tokenizer

__all__ = ["ConversationCache"]


@dataclass(frozen=True)
class _Entry:
    text: str
    ids: array[int]
    starts: array[int]


class ConversationCache:
    def __init__(
        self, tokenizer: Tokenizer, max_tokens: int = 1 << 21, backoff_chars: int = 64
    ) -> None:
        self._tokenizer = tokenizer
        self._max_tokens = max_tokens
        self._backoff = backoff_chars
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self._tokens = 0
        self._lock = threading.Lock()
        self.repeated = 0
        self.extended = 0
        self.full = 0

    def tokenize(self, text: str, prefix_keys: Sequence[bytes], own_key: bytes) -> list[int]:
        """Token ids of ``text`` (no special tokens added), reusing a cached prefix if one fits.

        ``prefix_keys``: digests of the conversation's shorter prefixes, longest first;
        ``own_key``: this conversation's digest, under which the result is cached.
        """
        entry = None
        with self._lock:
            same = self._entries.get(own_key)
            if same is not None and same.text == text:
                self._entries.move_to_end(own_key)
                self.repeated += 1
                return same.ids.tolist()
            for key in prefix_keys:
                candidate = self._entries.get(key)
                if candidate is not None and text.startswith(candidate.text):
                    self._entries.move_to_end(key)
                    entry = candidate
                    break
        result = self._extend(entry, text) if entry is not None else None
        if result is None:
            encoding = self._tokenizer.encode(text, add_special_tokens=False)
            result = (array("q", encoding.ids), array("q", (o[0] for o in encoding.offsets)))
            self.full += 1
        else:
            self.extended += 1
        ids, starts = result
        self._store(own_key, _Entry(text, ids, starts))
        return ids.tolist()

    def _extend(self, entry: _Entry, text: str) -> tuple[array[int], array[int]] | None:
        limit = len(entry.text) - self._backoff
        k = len(entry.starts) - 1
        while k > 0 and (entry.starts[k] > limit or entry.starts[k] <= entry.starts[k - 1]):
            k -= 1
        if k <= 0:
            return None
        cut = entry.starts[k]
        tail = self._tokenizer.encode(entry.text[cut:], add_special_tokens=False)
        if tail.ids != entry.ids[k:].tolist():
            return None
        fresh = self._tokenizer.encode(text[cut:], add_special_tokens=False)
        ids = entry.ids[:k]
        ids.extend(fresh.ids)
        starts = entry.starts[:k]
        starts.extend(cut + o[0] for o in fresh.offsets)
        return ids, starts

    def _store(self, key: bytes, entry: _Entry) -> None:
        size = len(entry.ids)
        if size > self._max_tokens:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._tokens -= len(old.ids)
            self._entries[key] = entry
            self._tokens += size
            while self._tokens > self._max_tokens:
                _, dropped = self._entries.popitem(last=False)
                self._tokens -= len(dropped.ids)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
