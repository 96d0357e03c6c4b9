"""``lmcache-disagg-proxy``: the PD proxy's command line.

Workers::

    --prefill HOST:PORT            (repeatable)
    --decode  HOST:PORT[,kv=HOST:PORT]   (repeatable; kv defaults to HOST + the YAML listen_port,
                                          i.e. 17555 unless the config file says otherwise)
    --config FILE                  the shared YAML (prefill_instances / decode_instances)

Keys come from flags or, preferably (flags show up in ``ps``), from the environment:
``LMCACHE_PROXY_API_KEY``, ``LMCACHE_PROXY_ADMIN_KEY``, ``LMCACHE_PROXY_WORKER_KEY``.

The app (``lmcache_disagg.proxy.app:create_app``) is served on uvicorn (server.py).
``--workers N`` runs N uvicorn worker processes on one listening socket. Each has its own upstream
session, health checks and concurrency limit; ``/metrics`` on any of them merges all of them, and
``/workers`` changes reach every process within one health interval through a shared state file
(see ``sharedstate.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence

from lmcache_disagg.config import load_config
from lmcache_disagg.errors import ConfigError
from lmcache_disagg.proxy.settings import POLICIES, ProxySettings, Timeouts, parse_worker_spec

__all__ = ["build_parser", "main", "settings_from_args"]

_log = logging.getLogger("lmcache_disagg.proxy")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lmcache-disagg-proxy",
        description="OpenAI-compatible disaggregated prefill/decode proxy for vLLM workers",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--prefill",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="a prefill worker (repeatable)",
    )
    p.add_argument(
        "--decode",
        action="append",
        default=[],
        metavar="HOST:PORT[,kv=HOST:PORT]",
        help="a decode worker and optionally its KV endpoint (repeatable)",
    )
    p.add_argument("--config", metavar="FILE", help="lmcache-disagg YAML (worker lists, ports)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, metavar="PORT", help="TCP port to listen on")
    p.add_argument(
        "--policy", choices=POLICIES, default="round_robin", help="how P and D are picked"
    )
    p.add_argument("--api-key", default=None, help="client Bearer key (env LMCACHE_PROXY_API_KEY)")
    p.add_argument(
        "--admin-key", default=None, help="Bearer key for /workers (env LMCACHE_PROXY_ADMIN_KEY)"
    )
    p.add_argument(
        "--worker-key",
        default=None,
        help="Bearer key sent to workers (env LMCACHE_PROXY_WORKER_KEY)",
    )
    p.add_argument(
        "--connect-timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="seconds to open a connection to a worker",
    )
    p.add_argument(
        "--prefill-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="seconds for the whole prefill leg on P",
    )
    p.add_argument(
        "--first-byte-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="streaming decode: seconds until D's first byte",
    )
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="streaming decode: longest gap between chunks, in seconds",
    )
    p.add_argument(
        "--decode-timeout",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="non-streaming decode: seconds for the whole answer",
    )
    p.add_argument(
        "--health-interval",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="seconds between health checks of each worker",
    )
    p.add_argument(
        "--health-timeout",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="seconds one health check may take",
    )
    p.add_argument(
        "--breaker-threshold",
        type=int,
        default=3,
        metavar="FAILURES",
        help="consecutive failures that open a worker's circuit breaker",
    )
    p.add_argument(
        "--breaker-cooldown",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="seconds an open breaker waits before a half-open trial",
    )
    p.add_argument(
        "--max-concurrency",
        type=int,
        default=1024,
        metavar="REQUESTS",
        help="in-flight requests per process before answering 429",
    )
    p.add_argument(
        "--local-prefill-threshold",
        type=int,
        default=0,
        metavar="TOKENS",
        help="prompts shorter than this (estimated tokens) skip P; 0 = off",
    )
    p.add_argument(
        "--tokenizer",
        metavar="DIR",
        help="cache_aware: the model directory holding tokenizer.json; None = the workers' model, "
        "when it is a local directory",
    )
    p.add_argument(
        "--kv-events",
        action="append",
        default=[],
        metavar="WORKER=tcp://HOST:PORT|auto[:PORT]",
        help="cache_aware: a worker's KV events endpoint (repeatable), or auto: every worker's "
        "host at the default events port",
    )
    p.add_argument(
        "--skip-prefill-chunks",
        type=int,
        default=1,
        metavar="N",
        help="cache_aware: D computes the prompt itself when it lacks at most N chunks of it "
        "(-1: never)",
    )
    p.add_argument(
        "--no-local-fallback",
        action="store_true",
        help="fail instead of letting D prefill when no P is usable",
    )
    p.add_argument(
        "--prefill-attempts",
        type=int,
        default=2,
        metavar="N",
        help="P workers tried per request before D prefills locally",
    )
    p.add_argument(
        "--decode-attempts",
        type=int,
        default=2,
        metavar="N",
        help="D workers tried per request (only before D's first byte)",
    )
    p.add_argument(
        "--decode-retry-repush",
        action="store_true",
        help="on a D retry, prefill again pushing to the new D (otherwise the new D prefills)",
    )
    p.add_argument(
        "--max-body",
        type=int,
        default=4 * 1024 * 1024,
        metavar="BYTES",
        help="largest request body in bytes (413 above)",
    )
    p.add_argument(
        "--body-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="seconds a client may take to send a request body (408 after)",
    )
    p.add_argument(
        "--write-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="seconds a write may wait for a client that does not read (dropped after)",
    )
    p.add_argument(
        "--header-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="seconds a client may take to send a request's headers (408 after)",
    )
    p.add_argument(
        "--max-header-bytes",
        type=int,
        default=64 * 1024,
        metavar="BYTES",
        help="request line plus headers, in bytes (431 above)",
    )
    p.add_argument(
        "--keep-alive-timeout",
        type=float,
        default=75.0,
        metavar="SECONDS",
        help="seconds an idle client connection is kept",
    )
    p.add_argument("--docs", action="store_true", help="serve /docs and /openapi.json")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="uvicorn worker processes sharing the port",
    )
    p.add_argument(
        "--shutdown-grace",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="seconds requests in flight may take to finish after SIGTERM",
    )
    p.add_argument(
        "--status-interval",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="seconds between status log lines (req/s, in flight, p50 TTFT, errors, KV GB/s, "
        "cache hit rate over the interval); 0 = off",
    )
    p.add_argument(
        "--kv-probe",
        action="store_true",
        help="a D is healthy only if its KV listener answers the transfer handshake "
        "(authenticated with the cluster secret from --config or "
        "LMCACHE_CLUSTER_SECRET)",
    )
    p.add_argument(
        "--no-access-log", action="store_true", help="no JSON access-log line per request"
    )
    p.add_argument(
        "--log-level",
        default="info",
        type=str.lower,
        choices=("debug", "info", "warning", "error", "critical"),
        help="log level (warning and above also turn the access log off)",
    )
    return p  # fmt: skip


def settings_from_args(args: argparse.Namespace) -> ProxySettings:
    """Merge flags, env keys and the YAML worker lists into one ProxySettings."""
    cfg = load_config(args.config) if args.config else None
    kv_port = cfg.listen_port if cfg is not None else None
    prefill = [parse_worker_spec("prefill", text) for text in args.prefill]
    decode = [
        parse_worker_spec("decode", text, **({"kv_port": kv_port} if kv_port else {}))
        for text in args.decode
    ]
    if cfg is not None:
        for inst in cfg.prefill_instances:
            prefill.append(parse_worker_spec("prefill", inst.http))
        for inst in cfg.decode_instances:
            text = inst.http if inst.kv is None else f"{inst.http},kv={inst.kv}"
            decode.append(
                parse_worker_spec("decode", text, **({"kv_port": kv_port} if kv_port else {}))
            )
    if not decode:
        raise ConfigError("at least one --decode worker is required")
    if not prefill:
        _log.warning(
            "no --prefill worker: requests are prefilled on D (or refused with "
            "--no-local-fallback) until a P is added with POST /workers; /ready stays false "
            "until then"
        )
    env = os.environ
    return ProxySettings(
        prefill=tuple(prefill),
        decode=tuple(decode),
        host=args.host,
        port=args.port,
        policy=args.policy,
        api_key=args.api_key or env.get("LMCACHE_PROXY_API_KEY") or None,
        admin_key=args.admin_key or env.get("LMCACHE_PROXY_ADMIN_KEY") or None,
        worker_key=args.worker_key or env.get("LMCACHE_PROXY_WORKER_KEY") or None,
        timeouts=Timeouts(
            connect=args.connect_timeout,
            prefill=args.prefill_timeout,
            first_byte=args.first_byte_timeout,
            idle=args.idle_timeout,
            decode=args.decode_timeout,
            health=args.health_timeout,
        ),
        max_concurrency=args.max_concurrency,
        local_prefill_threshold=args.local_prefill_threshold,
        local_fallback=not args.no_local_fallback,
        prefill_attempts=args.prefill_attempts,
        decode_attempts=args.decode_attempts,
        decode_retry_repush=args.decode_retry_repush,
        health_interval=args.health_interval,
        breaker_threshold=args.breaker_threshold,
        breaker_cooldown=args.breaker_cooldown,
        max_body=args.max_body,
        body_timeout=args.body_timeout,
        write_timeout=args.write_timeout,
        header_timeout=args.header_timeout,
        max_header_bytes=args.max_header_bytes,
        keep_alive_timeout=args.keep_alive_timeout,
        docs=args.docs,
        # The access log is INFO-level: --log-level warning (or higher) turns it off too.
        access_log=not args.no_access_log and _level(args.log_level) <= logging.INFO,
        shutdown_grace=args.shutdown_grace,
        status_interval=args.status_interval,
        kv_probe=args.kv_probe,
        cluster_secret=(cfg.cluster_secret if cfg is not None else None)
        or env.get("LMCACHE_CLUSTER_SECRET")
        or None,
        workers=args.workers,
        tokenizer=args.tokenizer,
        kv_events=tuple(args.kv_events),
        skip_prefill_chunks=args.skip_prefill_chunks,
    )


def _level(name: str) -> int:
    level = logging.getLevelName(name.upper())
    return level if isinstance(level, int) else logging.INFO


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )


def _config_failure(exc: ConfigError) -> int:
    print(f"lmcache-disagg-proxy: {exc}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    from lmcache_disagg.proxy.server import run

    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    state_dir: str | None = None
    try:
        settings = settings_from_args(args)
        if settings.workers > 1:
            state_dir = tempfile.mkdtemp(prefix="lmcache-proxy-")
            metrics_dir = os.path.join(state_dir, "metrics")
            os.mkdir(metrics_dir)
            # prometheus_client picks its value storage when it is imported, so the spawned
            # workers must inherit this before they import it.
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
            settings = dataclasses.replace(
                settings,
                state_file=os.path.join(state_dir, "workers.json"),
                metrics_dir=metrics_dir,
            )
        run(settings, args.log_level)
    except ConfigError as exc:
        return _config_failure(exc)
    finally:
        if state_dir is not None:
            shutil.rmtree(state_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
