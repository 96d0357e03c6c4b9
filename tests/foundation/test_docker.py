"""Static checks of the docker-compose clusters (no Docker engine runs on these machines).

Every worker's ``--kv-transfer-config`` must name our connector and carry a config our schema
accepts; every proxy command must parse with the real proxy CLI; every file a Dockerfile copies and
every config a service points at must exist.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from lmcache_disagg.config import load_config
from lmcache_disagg.proxy.cli import build_parser, settings_from_args

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILES = sorted((REPO_ROOT / "docker").glob("compose.*.yaml"))
DOCKERFILES = sorted((REPO_ROOT / "docker").glob("Dockerfile.*"))


def _commands(compose: dict) -> dict[str, list[str]]:
    return {
        name: [str(part) for part in svc.get("command", [])]
        for name, svc in compose["services"].items()
    }


def test_there_are_compose_files_and_dockerfiles() -> None:
    assert len(COMPOSE_FILES) >= 2 and len(DOCKERFILES) >= 2


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_worker_kv_configs_are_valid(path: Path) -> None:
    compose = yaml.safe_load(path.read_text())
    workers = 0
    for name, command in _commands(compose).items():
        if "--kv-transfer-config" not in command:
            continue
        workers += 1
        kv = json.loads(command[command.index("--kv-transfer-config") + 1])
        assert kv["kv_connector"] == "LMCacheDisaggConnector", name
        assert kv["kv_connector_module_path"] == "lmcache_disagg.connector", name
        assert kv["kv_role"] in ("kv_producer", "kv_consumer", "kv_both"), name
        load_config(overrides=kv.get("kv_connector_extra_config", {}), environ={})
        env = compose["services"][name].get("environment", {})
        config_file = env.get("LMCACHE_CONFIG_FILE") if isinstance(env, dict) else None
        if config_file:
            local = REPO_ROOT / config_file.removeprefix("/opt/lmcache-disagg/")
            assert local.exists(), f"{name}: {config_file} is not shipped in configs/"
            load_config(local, environ={})
    assert workers >= 2


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_proxy_commands_parse_with_the_real_cli(path: Path) -> None:
    compose = yaml.safe_load(path.read_text())
    proxies = [cmd for cmd in _commands(compose).values() if cmd[:1] == ["lmcache-disagg-proxy"]]
    assert proxies, "a cluster needs a proxy"
    for command in proxies:
        settings = settings_from_args(build_parser().parse_args(command[1:]))
        assert settings is not None


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copies_existing_paths(path: Path) -> None:
    for source in re.findall(r"^COPY\s+(\S+)", path.read_text(), re.M):
        for part in source.split():
            assert (REPO_ROOT / part).exists(), f"{path.name} copies missing {part}"
