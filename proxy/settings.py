"""The proxy's runtime settings: one frozen value object built by the CLI (or by tests).

Keys are held here only; ``__repr__`` masks them so a settings object can be logged safely.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal

from lmcache_disagg.config import DEFAULT_KV_PORT, http_address, split_host_port
from lmcache_disagg.errors import ConfigError

__all__ = ["POLICIES", "ProxySettings", "Timeouts", "WorkerSpec", "parse_worker_spec"]

Policy = Literal["round_robin", "least_loaded", "prefix_aware", "cache_aware"]
POLICIES: tuple[Policy, ...] = ("round_robin", "least_loaded", "prefix_aware", "cache_aware")


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Deadlines of every hop, in seconds. None disables one (not recommended)."""

    connect: float = 5.0
    prefill: float = 60.0
    first_byte: float = 60.0
    """Streaming D: until the first body byte (covers queueing and KV loading on D)."""
    idle: float = 60.0
    """Streaming D: the longest gap between two body chunks."""
    decode: float = 600.0
    """Non-streaming D: the whole answer (a non-streamed answer has no earlier byte)."""
    health: float = 2.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and not value > 0:
                raise ConfigError(f"the {f.name} timeout must be > 0 seconds, got {value}")


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """One worker: its HTTP ``host:port`` and, for D, the ``host:port`` of its KV listener."""

    role: Literal["prefill", "decode"]
    http: str
    kv: str
    events: str | None = None
    """cache_aware: its KV events endpoint (``tcp://HOST:PORT[,snapshot=tcp://HOST:PORT]``) when
    added through ``/workers`` with one; None: the start-up ``--kv-events`` rules apply."""

    @property
    def base_url(self) -> str:
        return f"http://{self.http}"


def parse_worker_spec(
    role: Literal["prefill", "decode"], text: str, kv_port: int = DEFAULT_KV_PORT
) -> WorkerSpec:
    """``host:port`` or ``host:port,kv=host:port`` -> WorkerSpec (KV default: host + kv_port).

    The HTTP address may also be written as a URL, ``http://host:port``.
    """
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts:
        raise ConfigError(f"empty --{role} value")
    host, port = split_host_port(http_address(parts[0]))
    kv: str | None = None
    for option in parts[1:]:
        key, sep, value = option.partition("=")
        if not sep or key != "kv":
            raise ConfigError(f"unknown option {option!r} in --{role} {text!r} (use kv=host:port)")
        split_host_port(value)
        kv = value
    http_host = f"[{host}]" if ":" in host else host
    if kv is None:
        kv = f"{http_host}:{kv_port}"
    return WorkerSpec(role=role, http=f"{http_host}:{port}", kv=kv)


@dataclass(frozen=True, slots=True)
class ProxySettings:
    """Everything the proxy needs at run time. Built once; never mutated."""

    prefill: tuple[WorkerSpec, ...] = ()
    decode: tuple[WorkerSpec, ...] = ()
    host: str = "127.0.0.1"
    port: int = 8000
    policy: Policy = "round_robin"
    api_key: str | None = None
    admin_key: str | None = None
    worker_key: str | None = None
    timeouts: Timeouts = field(default_factory=Timeouts)
    max_concurrency: int = 1024
    retry_after: int = 1
    local_prefill_threshold: int = 0
    """Prompts with fewer (estimated) tokens skip P and run on D alone; 0 disables."""
    local_fallback: bool = True
    """When no P is usable, D prefills locally instead of failing the request."""
    prefill_attempts: int = 2
    decode_attempts: int = 2
    decode_retry_repush: bool = False
    """On a D retry, run a fresh prefill pushing to the new D (else the new D prefills locally)."""
    health_interval: float = 2.0
    breaker_threshold: int = 3
    breaker_cooldown: float = 5.0
    max_body: int = 4 * 1024 * 1024
    """Request body bytes; a larger body is refused with 413 while it is being read."""
    max_tokens_limit: int = 1 << 20
    body_timeout: float = 30.0
    """Seconds a client may take to send a request body."""
    write_timeout: float = 60.0
    """Seconds one write to the client may wait for it to read, before it is dropped."""
    header_timeout: float = 30.0
    """Seconds a client may take to send a request's headers (uvicorn has no such deadline; the
    proxy's own HTTP protocol class adds it, see server.py)."""
    max_header_bytes: int = 64 * 1024
    """Request line plus headers; larger requests are refused with 431 while they arrive."""
    keep_alive_timeout: float = 75.0
    """Seconds an idle client connection is kept open."""
    docs: bool = False
    """Serve ``/docs`` and ``/openapi.json``."""
    access_log: bool = True
    state_file: str | None = None
    """Set by the CLI for ``--workers N > 1``: the worker list shared by the processes."""
    metrics_dir: str | None = None
    """Set by the CLI for ``--workers N > 1``: prometheus_client's multiprocess directory, so
    ``/metrics`` on any process reports the totals of all of them."""
    kv_probe: bool = False
    """Health of a D also requires its KV listener to answer the transfer handshake."""
    cluster_secret: str | None = None
    """Used only by the KV probe (authenticated handshake). Never logged."""
    shutdown_grace: float = 10.0
    status_interval: float = 10.0
    """Seconds between status log lines (req/s, in flight, TTFT, errors, KV GB/s, hit rate); 0 =
    off."""
    workers: int = 1
    upstream_pool_size: int = 1024
    tokenizer: str | None = None
    """cache_aware: the model directory with tokenizer.json (None: the workers' local model)."""
    kv_events: tuple[str, ...] = ()
    """cache_aware: ``WORKER=tcp://HOST:PORT[,snapshot=...]`` event sources, or ``auto[:PORT]``
    (every worker's host at the default events port)."""
    skip_prefill_chunks: int = 1
    """cache_aware: skip P when D lacks at most this many chunks of the prompt; -1 never."""

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ConfigError(f"unknown policy {self.policy!r}; use one of {', '.join(POLICIES)}")
        if self.max_concurrency < 1:
            raise ConfigError("max_concurrency must be >= 1")
        if self.workers < 1:
            raise ConfigError("workers must be >= 1")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be 0-65535, got {self.port}")
        at_least = {
            "prefill_attempts": 1, "decode_attempts": 1, "breaker_threshold": 1, "max_body": 1,
            "upstream_pool_size": 1, "retry_after": 0, "local_prefill_threshold": 0,
            "max_tokens_limit": 1,
        }  # fmt: skip
        for name, low in at_least.items():
            if getattr(self, name) < low:
                raise ConfigError(f"{name} must be >= {low}, got {getattr(self, name)}")
        if not self.health_interval > 0:
            raise ConfigError(f"health_interval must be > 0 seconds, got {self.health_interval}")
        for name in ("body_timeout", "write_timeout", "header_timeout", "keep_alive_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        if self.max_header_bytes < 1024:
            raise ConfigError(f"max_header_bytes must be >= 1024, got {self.max_header_bytes}")
        if self.skip_prefill_chunks < -1:
            raise ConfigError("skip_prefill_chunks must be >= 0, or -1 to never skip P")
        if self.kv_events and self.policy != "cache_aware":
            raise ConfigError("--kv-events is used by --policy cache_aware only")
        if self.policy == "cache_aware":
            from lmcache_disagg.proxy.kvrouting import event_sources

            event_sources(self.kv_events, [w.http for w in (*self.prefill, *self.decode)])
        for name in ("breaker_cooldown", "shutdown_grace"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name} must be >= 0 seconds, got {getattr(self, name)}")

    def __repr__(self) -> str:
        shown = []
        for f in fields(self):
            value = getattr(self, f.name)
            if (f.name.endswith("_key") or f.name == "cluster_secret") and value is not None:
                value = "<set>"
            shown.append(f"{f.name}={value!r}")
        return f"ProxySettings({', '.join(shown)})"

    __str__ = __repr__
