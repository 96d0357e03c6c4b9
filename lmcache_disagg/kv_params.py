"""Names of the ``kv_transfer_params`` fields exchanged between the proxy, P and D.

The proxy builds P's params, P's connector returns D's params from ``request_finished``, and the
proxy forwards them to D verbatim. Keeping the names here (torch-free) lets the proxy and the
connector agree without importing each other.

The stock vLLM ``NixlConnector`` fields (``do_remote_decode`` ... ``remote_port``) are always sent to
P too, so the same proxy drives stock NixlConnector workers (pull model) unchanged.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "DO_REMOTE_DECODE",
    "DO_REMOTE_PREFILL",
    "INTERNAL_REQUEST_FIELDS",
    "KV_TRANSFER_PARAMS",
    "NUM_TOKENS",
    "PROMPT_TOKEN_IDS",
    "PUSH_TARGET",
    "TRANSFER_ID",
]

KV_TRANSFER_PARAMS: Final = "kv_transfer_params"

# vLLM's own PD flags (shared with NixlConnector).
DO_REMOTE_DECODE: Final = "do_remote_decode"
DO_REMOTE_PREFILL: Final = "do_remote_prefill"

# lmcache-disagg push-model fields.
TRANSFER_ID: Final = "lmcache_transfer_id"
"""Opaque id the proxy makes per PD attempt; keys D's reservation (and is unique per attempt)."""
PUSH_TARGET: Final = "lmcache_push_target"
"""``host:port`` of D's KV listener that P pushes into (checked against P's allowlist)."""
NUM_TOKENS: Final = "lmcache_num_tokens"
"""Returned by P: how many prompt tokens' KV were pushed."""
PROMPT_TOKEN_IDS: Final = "lmcache_prompt_token_ids"
"""Returned by P: the prompt's token ids, so D can verify chunk keys without re-tokenizing."""

# Request fields a client may never set: the proxy strips them before routing.
INTERNAL_REQUEST_FIELDS: Final = frozenset({KV_TRANSFER_PARAMS})
