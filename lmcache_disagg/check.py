"""``lmcache-disagg check``: is a running PD cluster wired correctly?

    lmcache-disagg check [--config FILE] [--prefill HOST:PORT ...] [--decode HOST:PORT[,kv=HOST:PORT] ...]

It validates the config, then probes every worker (torch-free; stdlib HTTP plus the transfer probe):

* HTTP: ``/v1/models`` answers and serves the expected model (``--model``, else P's and D's agree);
* connector: ``lmcache_disagg_layout_info`` on the worker's ``/metrics`` names our connector's role
  (P: ``kv_producer`` or ``kv_both``; D: ``kv_consumer`` or ``kv_both``);
* KV endpoint: D's listener answers the transfer handshake, authenticated with ``cluster_secret``;
* layout: every P's layout equals D's handshake fingerprint (a mismatch names the field);
* the channel ``auto`` would choose, and the cache tiers each worker reports.

It prints one table, then one ``problem:`` line per problem (what is wrong, then how to fix it) and
exits 1 when there is any; 2 when the config itself is invalid.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from lmcache_disagg.config import DEFAULT_KV_PORT, LMCacheDisaggConfig, http_address, load_config
from lmcache_disagg.config import split_host_port as parse_host_port
from lmcache_disagg.errors import ConfigError
from lmcache_disagg.transfer.probe import ProbeResult, probe

__all__ = ["Problem", "WorkerReport", "check", "main", "parse_metrics_labels"]

PRODUCER_ROLES = ("kv_producer", "kv_both")
CONSUMER_ROLES = ("kv_consumer", "kv_both")
# Fields of P's layout info compared with D's handshake fingerprint, in report order.
LAYOUT_FIELDS = (
    "model",
    "dtype",
    "num_layers",
    "num_kv_heads",
    "head_dim",
    "chunk_size",
    "tp_size",
)
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)\{(.*)\}\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class Problem:
    """One line of the verdict: what is wrong, and how to fix it."""

    what: str
    fix: str

    def __str__(self) -> str:
        return f"problem: {self.what}; fix: {self.fix}"


@dataclass
class WorkerReport:
    """What was learned about one worker (one table row)."""

    role: str  # "P" or "D"
    http: str
    kv: str = ""
    models: list[str] = field(default_factory=list)
    layout: dict[str, str] | None = None
    metrics_ok: bool = False
    cache_tiers: list[str] = field(default_factory=list)
    handshake: ProbeResult | None = None


def parse_metrics_labels(text: str, name: str) -> list[dict[str, str]]:
    """The label sets of every sample of ``name`` in a Prometheus text exposition."""
    found = []
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and match.group(1) == name:
            found.append(dict(_LABEL.findall(match.group(2))))
    return found


def _get(url: str, timeout: float) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        body: bytes = response.read(16 << 20)
        return body.decode("utf-8", "replace")


def _probe_http(report: WorkerReport, timeout: float, problems: list[Problem]) -> None:
    base = f"http://{report.http}"
    try:
        models = json.loads(_get(base + "/v1/models", timeout))
        report.models = [str(m.get("id")) for m in models.get("data", []) if isinstance(m, dict)]
    except (OSError, ValueError, AttributeError) as exc:
        problems.append(
            Problem(
                f"{report.role} {report.http}: GET /v1/models failed ({exc})",
                "start the vLLM server, or correct the --prefill/--decode HOST:PORT (vLLM's --port)",
            )
        )
        return
    try:
        metrics = _get(base + "/metrics", timeout)
    except OSError as exc:
        problems.append(
            Problem(
                f"{report.role} {report.http}: GET /metrics failed ({exc})",
                "run vLLM's OpenAI server (its /metrics route carries the connector's metrics)",
            )
        )
        return
    report.metrics_ok = True
    infos = parse_metrics_labels(metrics, "lmcache_disagg_layout_info")
    if infos:
        report.layout = infos[0]
    tiers = {
        labels.get("tier", "")
        for labels in parse_metrics_labels(metrics, "lmcache_disagg_cache_capacity_bytes")
    }
    report.cache_tiers = sorted(t for t in tiers if t)


def _check_role(report: WorkerReport, problems: list[Problem]) -> None:
    if not report.metrics_ok:
        return
    want = PRODUCER_ROLES if report.role == "P" else CONSUMER_ROLES
    example = want[0]
    if report.layout is None:
        problems.append(
            Problem(
                f"{report.role} {report.http}: the lmcache-disagg connector is not loaded "
                "(no lmcache_disagg_layout_info on /metrics)",
                "start vLLM with --kv-transfer-config "
                '\'{"kv_connector":"LMCacheDisaggConnector","kv_connector_module_path":'
                f'"lmcache_disagg.connector","kv_role":"{example}"}}\'',
            )
        )
        return
    role = report.layout.get("role", "")
    if role not in want:
        problems.append(
            Problem(
                f"{report.role} {report.http}: the connector runs as {role!r}, "
                f"a {'prefill' if report.role == 'P' else 'decode'} worker needs "
                f"{' or '.join(want)}",
                f'set "kv_role":"{example}" in its --kv-transfer-config',
            )
        )


def _check_models(
    reports: list[WorkerReport], expected: str | None, problems: list[Problem]
) -> None:
    served = [r for r in reports if r.models]
    if expected is None and served:
        expected = served[0].models[0]
    for report in served:
        if expected not in report.models:
            problems.append(
                Problem(
                    f"{report.role} {report.http}: serves {report.models}, not {expected!r}",
                    "serve the same model (and --served-model-name) on every P and D",
                )
            )


def _check_handshake(
    report: WorkerReport, config: LMCacheDisaggConfig, timeout: float, problems: list[Problem]
) -> None:
    result = probe(report.kv, timeout, config.cluster_secret)
    report.handshake = result
    if result.ok:
        return
    where = f"D {report.http}: KV endpoint {report.kv}"
    if result.error == "unreachable":
        problems.append(
            Problem(
                f"{where} did not answer the handshake ({result.detail})",
                "point kv= (--decode HOST:PORT,kv=HOST:PORT or decode_instances[].kv) at D's "
                f"listen_port (default {DEFAULT_KV_PORT}), and let listen_host accept this host",
            )
        )
    elif result.error == "auth":
        problems.append(
            Problem(
                f"{where} refused authentication ({result.detail})",
                "set the same cluster_secret (YAML or LMCACHE_CLUSTER_SECRET) on every P, D, "
                "the proxy and this check",
            )
        )
    else:
        problems.append(
            Problem(
                f"{where} answered the handshake with {result.error}: {result.detail}",
                "run the same lmcache-disagg version on every worker",
            )
        )


def _d_layout(report: WorkerReport) -> dict[str, str] | None:
    """D's layout: the handshake's real fingerprint when we have it, else its /metrics info."""
    fingerprint = report.handshake.fingerprint if report.handshake else None
    if fingerprint is not None:
        return {name: str(getattr(fingerprint, name)) for name in LAYOUT_FIELDS}
    return report.layout


def _check_layouts(
    prefills: list[WorkerReport], decodes: list[WorkerReport], problems: list[Problem]
) -> None:
    for d in decodes:
        d_layout = _d_layout(d)
        if d_layout is None:
            continue
        for p in prefills:
            if p.layout is None:
                continue
            fields = [n for n in LAYOUT_FIELDS if p.layout.get(n) != d_layout.get(n)]
            if fields:
                detail = ", ".join(
                    f"{n}: P {p.layout.get(n)!r} != D {d_layout.get(n)!r}" for n in fields
                )
                problems.append(
                    Problem(
                        f"P {p.http} and D {d.http}: KV layout fingerprint mismatch ({detail})",
                        "serve the same model with the same --dtype, chunk_size and "
                        "tensor-parallel size on P and D",
                    )
                )


def _channel(p: WorkerReport | None, d: WorkerReport, config: LMCacheDisaggConfig) -> str:
    configured = (p.layout or {}).get("channel") if p else None
    configured = configured or config.channel
    if configured != "auto":
        return configured
    if d.handshake is None or not d.handshake.ok:
        return "?"
    return "auto->nixl" if d.handshake.channel == "nixl" else "auto->tcp"


def _configured_tiers(config: LMCacheDisaggConfig) -> list[str]:
    """The tiers the config turns on (keys of the tiered cache, absent in builds without it)."""
    tiers = []
    if getattr(config, "local_cpu", False):
        tiers.append("l1")
    if getattr(config, "local_disk", None):
        tiers.append("l2")
    if getattr(config, "remote_url", None):
        tiers.append("l3")
    return tiers


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows
    )


def _render(
    prefills: list[WorkerReport], decodes: list[WorkerReport], config: LMCacheDisaggConfig
) -> str:
    rows = [["role", "http", "model", "connector", "kv endpoint", "handshake", "channel", "cache"]]
    for report in [*prefills, *decodes]:
        if report.handshake is None:
            handshake = "-"
        elif report.handshake.ok:
            handshake = "ok+auth" if report.handshake.authenticated else "ok"
        else:
            handshake = report.handshake.error
        if report.role == "D":
            channel = _channel(prefills[0] if prefills else None, report, config)
        else:
            channel = (report.layout or {}).get("channel", "-")
        connector = (report.layout or {}).get("role", "missing" if report.metrics_ok else "?")
        rows.append(
            [
                report.role,
                report.http,
                ",".join(report.models) or "?",
                connector,
                report.kv or "-",
                handshake,
                channel,
                ",".join(report.cache_tiers) or "off",
            ]
        )
    return _table(rows)


def _parse_decode(spec: str, config: LMCacheDisaggConfig) -> tuple[str, str]:
    http, _, rest = spec.partition(",")
    http = http_address(http)
    kv = ""
    if rest:
        key, _, value = rest.partition("=")
        if key.strip() != "kv" or not value:
            raise ConfigError(f"expected HOST:PORT[,kv=HOST:PORT], got {spec!r}")
        parse_host_port(value.strip())
        kv = value.strip()
    if not kv:
        kv = f"{parse_host_port(http)[0]}:{config.listen_port}"
    return http, kv


def check(
    config: LMCacheDisaggConfig,
    prefill: list[str],
    decode: list[str],
    *,
    model: str | None = None,
    timeout: float = 3.0,
) -> tuple[str, list[Problem]]:
    """Probe the cluster; return the table and the problems (empty when healthy)."""
    problems: list[Problem] = []
    p_specs = [http_address(p) for p in prefill] or [i.http for i in config.prefill_instances]
    d_specs = [_parse_decode(d, config) for d in decode] or [
        _parse_decode(i.http + (f",kv={i.kv}" if i.kv else ""), config)
        for i in config.decode_instances
    ]
    if not p_specs or not d_specs:
        problems.append(
            Problem(
                "no prefill or no decode worker to check",
                "pass --prefill HOST:PORT and --decode HOST:PORT[,kv=HOST:PORT], or list "
                "prefill_instances and decode_instances in --config",
            )
        )
    prefills = [WorkerReport("P", http) for http in p_specs]
    decodes = [WorkerReport("D", http, kv) for http, kv in d_specs]
    for report in [*prefills, *decodes]:
        _probe_http(report, timeout, problems)
        _check_role(report, problems)
    _check_models([*prefills, *decodes], model, problems)
    for report in decodes:
        _check_handshake(report, config, timeout, problems)
    _check_layouts(prefills, decodes, problems)
    table = _render(prefills, decodes, config)
    tiers = _configured_tiers(config)
    table += "\nconfigured cache tiers: " + (",".join(tiers) if tiers else "off")
    return table, problems


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lmcache-disagg check",
        description="probe a running PD cluster: HTTP, connector role, KV handshake, layouts",
    )
    p.add_argument(
        "--config", metavar="FILE", help="lmcache-disagg YAML (default: $LMCACHE_CONFIG_FILE)"
    )
    p.add_argument(
        "--prefill", action="append", default=[], metavar="HOST:PORT", help="a P (repeatable)"
    )
    p.add_argument(
        "--decode",
        action="append",
        default=[],
        metavar="HOST:PORT[,kv=HOST:PORT]",
        help="a D and its KV endpoint (repeatable; kv default: D's host + listen_port)",
    )
    p.add_argument("--model", default=None, help="expected model id (default: what P serves)")
    p.add_argument(
        "--timeout", type=float, default=3.0, metavar="SECONDS", help="per probe (default: 3)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config)
        table, problems = check(
            config, args.prefill, args.decode, model=args.model, timeout=args.timeout
        )
    except ConfigError as exc:
        print(f"problem: {exc}; fix: correct the config key it names", file=sys.stderr)
        return 2
    print(table)
    for problem in problems:
        print(problem, file=sys.stderr)
    if not problems:
        print("ok: the cluster is wired correctly")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
