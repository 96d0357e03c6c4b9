"""``lmcache-disagg config-reference``: docs/configuration.md, generated from the pydantic schema.

    lmcache-disagg config-reference               # rewrite docs/configuration.md
    lmcache-disagg config-reference --check       # exit 1 when the file is stale (CI, tests)
    lmcache-disagg config-reference --output -    # print it

Every key of :class:`~lmcache_disagg.config.LMCacheDisaggConfig` gets its type, default, the
environment variable that overrides it and, where LMCache has the same setting, LMCache's name.
"""

from __future__ import annotations

import argparse
import sys
import typing
from pathlib import Path
from typing import Any

from pydantic.fields import FieldInfo

from lmcache_disagg.config import (
    CONFIG_FILE_ENV,
    ENV_PREFIX,
    InstanceConfig,
    LMCacheDisaggConfig,
    parse_duration,
    parse_size,
)

__all__ = ["DESCRIPTIONS", "LMCACHE_EQUIVALENTS", "main", "render"]

DEFAULT_OUTPUT = Path("docs/configuration.md")
# Our key -> LMCache's config key (LMCACHE_CONFIG_FILE YAML / LMCACHE_* env) with the same meaning.
LMCACHE_EQUIVALENTS = {
    "chunk_size": "chunk_size",
    "local_cpu": "local_cpu",
    "max_local_cpu_size": "max_local_cpu_size",
    "local_disk": "local_disk",
    "max_local_disk_size": "max_local_disk_size",
    "remote_url": "remote_url",
    "save_decode_cache": "save_decode_cache",
    "save_unfull_chunk": "save_unfull_chunk",
    "pool_size": "nixl_buffer_size",
    "pool_device": "nixl_buffer_device",
}
# For fields whose schema entry has no ``description`` (the schema's own text wins when present).
DESCRIPTIONS = {
    "channel": "KV transport: `auto` = NIXL when it imports and D's handshake offers a NIXL "
    "agent, else the built-in TCP channel; `nixl` / `tcp` force one",
    "nixl_backends": "NIXL backends to create (UCX covers RDMA, NVLink, shared memory, TCP)",
    "listen_port": "D's KV listener port (the handshake / control endpoint P and the proxy reach);"
    " TP rank i adds i",
    "pool_device": "where D's receive pool lives: `cuda` (VRAM, NIXL writes into the GPU), "
    "`pinned` or `cpu` host memory",
    "cluster_secret": "HMAC-SHA256 secret for mutual P/D authentication; required when D listens "
    "on a non-loopback address",
    "connect_timeout": "P: TCP/zmq connect to D's KV endpoint",
    "handshake_timeout": "P: hello + authentication round trip with D",
    "reserve_timeout": "P: waiting for room in D's pool (then D recomputes)",
    "push_deadline": "P: a request's whole push; P holds the request's blocks at most this long",
    "load_deadline": "D: waiting for pushed KV before recomputing it",
    "reservation_ttl": "D: a reservation not completed within this is freed",
    "prefill_instances": "proxy: the prefill workers (`--prefill` adds to them)",
    "decode_instances": "proxy: the decode workers and their KV endpoints (`--decode` adds)",
}
_SIZE_SUFFIXES = (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024))


def _kind_of(metadata: Any) -> str | None:
    """``size``, ``GB size`` or ``duration`` when a validator parses the value, else None."""
    for item in metadata:
        func = getattr(item, "func", None)
        if func is parse_size:
            return "size"
        if func is parse_duration:
            return "duration"
        if getattr(func, "__name__", "") == "parse_gb_size":
            return "GB size"
    return None


def _validator_kind(info: FieldInfo) -> str | None:
    kind = _kind_of(info.metadata)
    if kind is None:  # ``Seconds | None``: the validator sits inside the union
        for arg in typing.get_args(info.annotation):
            if typing.get_origin(arg) is typing.Annotated:
                kind = _kind_of(arg.__metadata__)
                if kind is not None:
                    optional = type(None) in typing.get_args(info.annotation)
                    return kind + (" or null" if optional else "")
    return kind


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin is tuple:
        return f"list of {_type_name(args[0])}"
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        names = [_type_name(a) for a in args if a is not type(None)]
        suffix = " or null" if type(None) in args else ""
        return " or ".join(names) + suffix
    if origin is typing.Annotated:
        return _type_name(args[0])
    if annotation is InstanceConfig:
        return "worker (`http`, `kv`)"
    return getattr(annotation, "__name__", str(annotation))


def _size_text(value: int) -> str:
    for suffix, unit in _SIZE_SUFFIXES:
        if value and value % unit == 0:
            return f"{value // unit}{suffix}"
    return str(value)


def _default_text(info: FieldInfo, kind: str | None) -> str:
    value = info.get_default(call_default_factory=True)
    if value is None:
        return "null"
    if kind == "size" and isinstance(value, int):
        return f"`{_size_text(value)}`"
    if kind == "GB size" and isinstance(value, int | float):
        return f"`{value:g}` (GB)"
    if kind and kind.startswith("duration") and isinstance(value, int | float):
        return f"`{value:g}s`"
    if isinstance(value, tuple):
        return "`[]`" if not value else "`[" + ", ".join(str(v) for v in value) + "]`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render() -> str:
    """The whole reference as Markdown (deterministic: the test compares it byte for byte)."""
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated by `lmcache-disagg config-reference` from lmcache_disagg/config.py;",
        "     do not edit by hand. `make docs` regenerates it, and a test fails when it is stale. -->",
        "",
        "One YAML schema for workers and proxy. Sources, later ones win: the defaults below, the",
        f"YAML file named by `{CONFIG_FILE_ENV}` (or `--config FILE`), vLLM's",
        f"`kv_connector_extra_config` (workers), then environment variables `{ENV_PREFIX}<KEY>`.",
        "Unknown keys and bad values are errors naming the key. Sizes accept `2GiB`, `512MiB`,",
        "`1e9` (bytes); a *GB size* is LMCache's rule: a bare number is GB (x 1024**3), `4GiB`",
        "works too. Durations accept `500ms`, `5s`, `2m` or a number of seconds. Lists come",
        "from the environment as YAML (`[UCX, GDS]`) or comma-separated (`UCX,GDS`).",
        "",
        "| key | type | default | environment | LMCache | description |",
        "|---|---|---|---|---|---|",
    ]
    for name, info in LMCacheDisaggConfig.model_fields.items():
        kind = _validator_kind(info)
        type_text = kind or _type_name(info.annotation)
        lmcache = LMCACHE_EQUIVALENTS.get(name)
        row = [
            f"`{name}`",
            type_text,
            _default_text(info, kind),
            f"`{ENV_PREFIX}{name.upper()}`",
            f"`{lmcache}`" if lmcache else "-",
            _cell(info.description or DESCRIPTIONS.get(name, "")),
        ]
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "## Worker entries (`prefill_instances`, `decode_instances`)",
        "",
        "| key | type | default | description |",
        "|---|---|---|---|",
    ]
    for name, info in InstanceConfig.model_fields.items():
        default = "required" if info.is_required() else _default_text(info, None)
        row = [f"`{name}`", _type_name(info.annotation), default, _cell(info.description or "")]
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "Secrets (`cluster_secret`) are never logged; prefer `LMCACHE_CLUSTER_SECRET` to the file.",
        "The proxy's own flags are listed by `lmcache-disagg-proxy --help`.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lmcache-disagg config-reference",
        description="write the configuration reference generated from the config schema",
    )
    parser.add_argument(
        "--output",
        default=str(DEFAULT_OUTPUT),
        metavar="FILE",
        help=f"where to write it; - prints it (default: {DEFAULT_OUTPUT})",
    )
    parser.add_argument("--check", action="store_true", help="exit 1 if FILE is not up to date")
    args = parser.parse_args(argv)
    text = render()
    if args.output == "-":
        sys.stdout.write(text)
        return 0
    path = Path(args.output)
    if args.check:
        current = path.read_text() if path.exists() else ""
        if current != text:
            print(
                f"{path} is stale: run `lmcache-disagg config-reference --output {path}`",
                file=sys.stderr,
            )
            return 1
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
