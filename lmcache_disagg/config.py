"""The one YAML schema shared by the workers (connector, transfer) and the proxy.

Sources, later ones win:

1. the defaults below,
2. the YAML file named by ``LMCACHE_CONFIG_FILE`` (or passed explicitly),
3. a mapping given in code - for workers, vLLM's ``kv_connector_extra_config``,
4. environment variables ``LMCACHE_<KEY>`` (upper-case key, e.g. ``LMCACHE_CHUNK_SIZE=128``).

Unknown keys and bad values raise :class:`~lmcache_disagg.errors.ConfigError` naming the key.
Sizes accept ``2GiB``/``512MiB``/``1e9``; durations accept ``500ms``/``5s``/``2m`` or seconds.
This module is torch-free so the proxy can import it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from lmcache_disagg.errors import ConfigError

__all__ = [
    "CONFIG_FILE_ENV",
    "DEFAULT_KV_PORT",
    "ENV_PREFIX",
    "InstanceConfig",
    "LMCacheDisaggConfig",
    "http_address",
    "load_config",
    "parse_duration",
    "parse_gb_size",
    "parse_size",
    "split_host_port",
]

CONFIG_FILE_ENV = "LMCACHE_CONFIG_FILE"
ENV_PREFIX = "LMCACHE_"
# The one documented default for a decode worker's KV listener. In the single-host default the
# proxy combines D's HTTP host with this port, so ``--decode host:port`` alone is enough.
DEFAULT_KV_PORT = 17555

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_DURATION_UNITS = {"": 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "m": 60.0, "min": 60.0, "h": 3600.0}
_NUMBER_WITH_UNIT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: object) -> int:
    """``"2GiB"`` -> 2147483648. Integers pass through; negative sizes are rejected."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size such as 512MiB, got {value!r}")
    if isinstance(value, int | float):
        number, unit = float(value), ""
    elif isinstance(value, str) and (match := _NUMBER_WITH_UNIT.match(value)):
        number, unit = float(match.group(1)), match.group(2).lower()
    else:
        raise ValueError(f"expected a size such as 512MiB, got {value!r}")
    if unit not in _SIZE_UNITS:
        raise ValueError(
            f"unknown size unit {unit!r} in {value!r} (use B, KiB, MiB, GiB, KB, MB, GB)"
        )
    if number < 0:
        raise ValueError(f"size must not be negative, got {value!r}")
    return int(number * _SIZE_UNITS[unit])


def parse_duration(value: object) -> float:
    """``"500ms"`` -> 0.5 seconds. Numbers are seconds; negative durations are rejected."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration such as 5s, got {value!r}")
    if isinstance(value, int | float):
        number, unit = float(value), ""
    elif isinstance(value, str) and (match := _NUMBER_WITH_UNIT.match(value)):
        number, unit = float(match.group(1)), match.group(2).lower()
    else:
        raise ValueError(f"expected a duration such as 5s or 500ms, got {value!r}")
    if unit not in _DURATION_UNITS:
        raise ValueError(f"unknown duration unit {unit!r} in {value!r} (use ms, s, m, h)")
    if number < 0:
        raise ValueError(f"duration must not be negative, got {value!r}")
    return number * _DURATION_UNITS[unit]


def parse_gb_size(value: object) -> int:
    """LMCache's size rule for the cache tiers: a bare number is GB as LMCache means it
    (x 1024**3, so ``2`` and ``"2"`` -> 2 GiB, ``0.5`` -> 512 MiB); a value with a unit
    (``"4GiB"``, ``"512MiB"``, ``"1e9B"``) is parsed by :func:`parse_size`."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size such as 4 (GB) or 4GiB, got {value!r}")
    if isinstance(value, int | float):
        number = float(value)
    elif (
        isinstance(value, str) and (match := _NUMBER_WITH_UNIT.match(value)) and not match.group(2)
    ):
        number = float(match.group(1))
    else:
        return parse_size(value)
    if number < 0:
        raise ValueError(f"size must not be negative, got {value!r}")
    return int(number * 1024**3)


_REMOTE_SCHEMES = ("redis", "rediss", "valkey", "valkeys", "redis+cluster", "rediss+cluster")


def _local_disk_path(value: object) -> str | None:
    """``file:///path`` or a plain path -> the path; None / "" -> None (no disk tier)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"expected a path or file:///path, got {value!r}")
    text = value.strip()
    if not text:
        return None
    if text.lower().startswith("file://"):
        text = text[len("file://") :]
    elif "://" in text:
        raise ValueError(f"local_disk must be a path or file:///path, got {value!r}")
    if not text:
        raise ValueError(f"local_disk has no path: {value!r}")
    return text


def _remote_url(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"expected a redis:// URL, got {value!r}")
    text = value.strip()
    if not text:
        return None
    scheme = text.partition("://")[0].lower()
    if "://" not in text or scheme not in _REMOTE_SCHEMES:
        raise ValueError(
            f"remote_url must start with one of {', '.join(s + '://' for s in _REMOTE_SCHEMES)};"
            f" got {value!r}"
        )
    return text


Size = Annotated[int, BeforeValidator(parse_size)]
GBSize = Annotated[int, BeforeValidator(parse_gb_size)]
Seconds = Annotated[float, BeforeValidator(parse_duration)]


def _split_host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or "/" in host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected host:port, got {value!r}")
    return host.strip("[]"), int(port)


def _http_address(value: str) -> str:
    """A worker's HTTP address as ``host:port``; accepts ``http://host:port[/]`` as users copy it
    from vLLM's startup log or other routers' flags."""
    text = value.strip()
    if text.lower().startswith("https://"):
        raise ValueError(
            f"workers are reached over plain HTTP (put TLS in front of the proxy), got {value!r}"
        )
    if text.lower().startswith("http://"):
        text = text[len("http://") :].rstrip("/")
    _split_host_port(text)
    return text


class InstanceConfig(BaseModel):
    """One vLLM worker as the proxy sees it: its HTTP address and, for D, its KV endpoint."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    http: str = Field(description="host:port of the worker's OpenAI server")
    kv: str | None = Field(
        default=None, description="host:port of D's KV listener; default: http host + listen_port"
    )

    @field_validator("http")
    @classmethod
    def _check_http(cls, value: str) -> str:
        return _http_address(value)

    @field_validator("kv")
    @classmethod
    def _check_host_port(cls, value: str | None) -> str | None:
        if value is not None:
            _split_host_port(value)
        return value


class LMCacheDisaggConfig(BaseModel):
    """Every tunable of lmcache-disagg. Field names are the YAML keys."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    # -- layout and cache ---------------------------------------------------------------------
    chunk_size: int = Field(default=256, ge=1, le=65536, description="tokens per KV chunk")

    # -- tiered chunk store (LMCache's names and meanings first) -------------------------------
    local_cpu: bool = Field(default=True, description="L1: keep chunks in CPU RAM")
    # Defaults are validated like user input (validate_default): 1.0 means 1 GB as LMCache says.
    max_local_cpu_size: GBSize = Field(
        default=1.0,  # type: ignore[assignment]
        description="L1 bytes; a bare number is GB (x 1024**3)",
    )
    local_disk: Annotated[str | None, BeforeValidator(_local_disk_path)] = Field(
        default=None, description="L2 directory (path or file:///path); None = no disk tier"
    )
    max_local_disk_size: GBSize = Field(
        default=10.0,  # type: ignore[assignment]
        description="L2 bytes for the whole directory (all files, all TP ranks of the host); "
        "a bare number is GB",
    )
    remote_url: Annotated[str | None, BeforeValidator(_remote_url)] = Field(
        default=None,
        description="L3 Redis/Valkey: redis://, rediss://, valkey://, valkeys://, "
        "redis+cluster://; None = no remote tier",
    )
    save_decode_cache: bool = Field(
        default=False, description="also store the chunks that decode completes"
    )
    save_unfull_chunk: bool = Field(
        default=True, description="store the partial last chunk of a prompt too"
    )
    local_disk_fsync: Literal["never", "always"] = Field(
        default="never", description="fsync each L2 file before it is renamed into place"
    )
    remote_timeout: Seconds = Field(default=0.5, description="deadline of every L3 call")
    remote_max_connections: int = Field(
        default=16, ge=1, le=4096, description="L3 connection pool bound"
    )
    remote_ttl: Seconds | None = Field(default=None, description="L3 key TTL; None = no expiry")
    remote_cluster: bool = Field(default=False, description="remote_url is a Redis Cluster")
    cache_lease_ttl: Seconds = Field(
        default=30.0, description="a lookup's pins expire after this if never released"
    )
    cache_write_queue: int = Field(
        default=256, ge=1, le=1 << 20, description="chunks queued for lower-tier writes"
    )

    # -- transfer -----------------------------------------------------------------------------
    channel: Literal["auto", "nixl", "tcp"] = "auto"
    nixl_backends: tuple[str, ...] = ("UCX",)
    nixl_progress_thread: bool = Field(
        default=False,
        description="start NIXL's own progress thread; off, our threads drive progress (the "
        "sender polls its WRITEs, D polls notifications every millisecond). Measured here: the "
        "thread spins on UCX's worker lock while a WRITE copies and cut a 32 MiB WRITE loop "
        "from about 11 to 4 GB/s",
    )
    listen_host: str = Field(default="127.0.0.1", description="address D's KV listener binds")
    listen_port: int = Field(default=DEFAULT_KV_PORT, ge=0, le=65535)
    data_port: int = Field(
        default=0, ge=0, le=65535, description="D's TCP data listener port; 0 = ephemeral"
    )
    advertised_data_port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="data port announced to senders instead of the bound one (NAT, port "
        "forwarding, fault injection); None = the bound port",
    )
    pool_size: Size = Field(default=parse_size("256MiB"), description="receive pool bytes")
    pool_device: Literal["cpu", "pinned", "cuda"] = "cpu"
    send_buffer_size: Size = Field(default=parse_size("64MiB"), description="P staging bytes")
    cluster_secret: str | None = Field(default=None, repr=False, description="HMAC peer auth")
    push_allowlist: tuple[str, ...] = Field(
        default=(), description="host:port KV endpoints P may push to; empty = loopback only"
    )

    # -- deadlines and TTLs -------------------------------------------------------------------
    connect_timeout: Seconds = 5.0
    handshake_timeout: Seconds = 5.0
    reserve_timeout: Seconds = 5.0
    push_deadline: Seconds = 30.0
    load_deadline: Seconds = 30.0
    reservation_ttl: Seconds = 60.0

    # -- proxy --------------------------------------------------------------------------------
    prefill_instances: tuple[InstanceConfig, ...] = ()
    decode_instances: tuple[InstanceConfig, ...] = ()

    @field_validator("push_allowlist")
    @classmethod
    def _check_allowlist(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for entry in value:
            _split_host_port(entry)
        return value

    def __repr__(self) -> str:
        # pydantic honours repr=False, but be explicit: the secret never reaches a log line.
        fields = ", ".join(
            f"{name}={'<set>' if name == 'cluster_secret' and val else val!r}"
            for name, val in self.__dict__.items()
        )
        return f"LMCacheDisaggConfig({fields})"

    __str__ = __repr__


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for name in LMCacheDisaggConfig.model_fields:
        raw = environ.get(ENV_PREFIX + name.upper())
        if raw is None:
            continue
        # Lists come from env as YAML (``LMCACHE_NIXL_BACKENDS='[UCX, GDS]'``) or comma lists.
        annotation = LMCacheDisaggConfig.model_fields[name].annotation
        if "tuple" in str(annotation) and not raw.lstrip().startswith("["):
            overrides[name] = [item.strip() for item in raw.split(",") if item.strip()]
        else:
            overrides[name] = yaml.safe_load(raw) if raw.strip() else raw
    return overrides


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping, got {type(loaded).__name__}")
    return loaded


def load_config(
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> LMCacheDisaggConfig:
    """Build the effective config from defaults, YAML file, ``overrides`` and env vars."""
    environ = os.environ if environ is None else environ
    merged: dict[str, Any] = {}
    file_path = path if path is not None else environ.get(CONFIG_FILE_ENV)
    if file_path:
        merged.update(_read_yaml(Path(file_path)))
    if overrides:
        merged.update({k: v for k, v in overrides.items()})
    merged.update(_env_overrides(environ))
    try:
        return LMCacheDisaggConfig.model_validate(merged)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            key = ".".join(str(part) for part in error["loc"]) or "<root>"
            message = error["msg"]
            if error["type"] == "extra_forbidden":
                message = "unknown key"
            problems.append(f"{key}: {message}")
        raise ConfigError("invalid lmcache-disagg config: " + "; ".join(problems)) from None


def split_host_port(value: str) -> tuple[str, int]:
    """Parse ``host:port`` (IPv6 in brackets allowed); raise ConfigError naming the value."""
    try:
        return _split_host_port(value)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def http_address(value: str) -> str:
    """Normalize a worker's HTTP address (``host:port`` or ``http://host:port[/]``) to
    ``host:port``; raise ConfigError naming the value."""
    try:
        return _http_address(value)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
