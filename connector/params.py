"""Parse and build the ``kv_transfer_params`` the connector reads and returns (torch-free).

Everything here comes from outside the worker (the proxy for P, P's answer via the proxy for D), so
every field is type- and range-checked; a malformed field raises :class:`ParamsError` naming it,
and the connector then simply does not push (P) or does not load (D) - never a crash, never a
wrong load.

Field names live in :mod:`lmcache_disagg.kv_params` (shared with the proxy).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lmcache_disagg.config import split_host_port
from lmcache_disagg.connector.errors import ParamsError
from lmcache_disagg.errors import ConfigError
from lmcache_disagg.kv_params import (
    DO_REMOTE_DECODE,
    DO_REMOTE_PREFILL,
    NUM_TOKENS,
    PROMPT_TOKEN_IDS,
    PUSH_TARGET,
    TRANSFER_ID,
)

__all__ = [
    "MAX_PROMPT_TOKENS",
    "MAX_TRANSFER_ID_LEN",
    "LoadParams",
    "PushParams",
    "decode_params_for",
    "parse_load_params",
    "parse_push_params",
]

MAX_TRANSFER_ID_LEN = 256
"""Same bound as the transfer protocol's (a longer id would be refused by D anyway)."""
MAX_PROMPT_TOKENS = 1 << 22
_MAX_TOKEN_ID = (1 << 63) - 1


@dataclass(frozen=True)
class PushParams:
    """P side: push this request's prompt KV into ``target`` under ``transfer_id``."""

    transfer_id: str
    target: str


@dataclass(frozen=True)
class LoadParams:
    """D side: P pushed the KV of ``prompt_token_ids[:num_tokens]`` under ``transfer_id``."""

    transfer_id: str
    num_tokens: int
    prompt_token_ids: tuple[int, ...]
    target: str


def _transfer_id(params: Mapping[str, Any]) -> str:
    value = params.get(TRANSFER_ID)
    if not isinstance(value, str) or not 0 < len(value) <= MAX_TRANSFER_ID_LEN:
        raise ParamsError(f"{TRANSFER_ID} must be a non-empty string of <= {MAX_TRANSFER_ID_LEN}")
    if not value.isprintable():
        raise ParamsError(f"{TRANSFER_ID} must be printable")
    return value


def _target(params: Mapping[str, Any]) -> str:
    value = params.get(PUSH_TARGET)
    if not isinstance(value, str):
        raise ParamsError(f"{PUSH_TARGET} must be a host:port string")
    try:
        split_host_port(value)
    except ConfigError as exc:
        raise ParamsError(f"{PUSH_TARGET}: {exc}") from None
    return value


def parse_push_params(params: Mapping[str, Any] | None) -> PushParams | None:
    """P side. None when the request is not a push request (no ``do_remote_decode`` + our fields).

    Raises ParamsError when it claims to be one but a field is malformed.
    """
    if not params or params.get(DO_REMOTE_DECODE) is not True:
        return None
    if TRANSFER_ID not in params and PUSH_TARGET not in params:
        return None  # a stock NixlConnector pull request: not ours
    return PushParams(_transfer_id(params), _target(params))


def parse_load_params(params: Mapping[str, Any] | None) -> LoadParams | None:
    """D side. None when the request carries no pushed KV of ours (no ``do_remote_prefill``)."""
    if not params or params.get(DO_REMOTE_PREFILL) is not True or TRANSFER_ID not in params:
        return None
    transfer_id = _transfer_id(params)
    tokens = params.get(PROMPT_TOKEN_IDS)
    if not isinstance(tokens, list | tuple) or len(tokens) > MAX_PROMPT_TOKENS:
        raise ParamsError(f"{PROMPT_TOKEN_IDS} must be a list of at most {MAX_PROMPT_TOKENS} ids")
    for token in tokens:
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token <= _MAX_TOKEN_ID:
            raise ParamsError(f"{PROMPT_TOKEN_IDS} holds a non-token value {token!r}")
    num_tokens = params.get(NUM_TOKENS)
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int):
        raise ParamsError(f"{NUM_TOKENS} must be an int")
    if not 0 <= num_tokens <= len(tokens):
        raise ParamsError(f"{NUM_TOKENS}={num_tokens} outside [0, {len(tokens)}]")
    return LoadParams(transfer_id, num_tokens, tuple(tokens), _target(params))


def decode_params_for(
    push: PushParams, prompt_token_ids: list[int], num_tokens: int
) -> dict[str, Any]:
    """What P's ``request_finished`` returns, for the proxy to forward to D verbatim."""
    return {
        DO_REMOTE_PREFILL: True,
        DO_REMOTE_DECODE: False,
        TRANSFER_ID: push.transfer_id,
        PUSH_TARGET: push.target,
        NUM_TOKENS: num_tokens,
        PROMPT_TOKEN_IDS: list(prompt_token_ids),
    }
