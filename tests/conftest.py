"""Shared fixtures: the session's tiny model and a factory for real vLLM (CPU) servers.

Servers are pinned to a core each (this box has 2) and are always torn down with their whole
process group, even when a test fails. A failing test gets the server logs appended to its report.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lmcache_disagg.tiny_model import TinyModelSpec, build_tiny_model
from lmcache_disagg.vllm_server import VLLMServer, VLLMServerSpec

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL_CACHE = Path(os.environ.get("LMCACHE_DISAGG_MODEL_CACHE", REPO_ROOT / ".models"))

ServerFactory = Callable[..., VLLMServer]


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The float32 tiny Llama, built once per machine (cached under .models/, never committed)."""
    return build_tiny_model(MODEL_CACHE / "tiny-f32", TinyModelSpec(dtype="float32"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for server in getattr(item, "_vllm_servers", []):
            report.sections.append((f"vllm server {server.address} log", server.log_tail(120)))


def _make_factory(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[ServerFactory, list[VLLMServer]]:
    servers: list[VLLMServer] = []

    def start(model_dir: Path | str, **spec_fields: Any) -> VLLMServer:
        spec = VLLMServerSpec(model_dir=str(model_dir), **spec_fields)
        log_dir = tmp_path_factory.mktemp("vllm-logs")
        server = VLLMServer(spec, log_dir / "server.log")
        servers.append(server)
        node_servers = getattr(request.node, "_vllm_servers", [])
        node_servers.append(server)
        request.node._vllm_servers = node_servers
        server.start()
        return server

    return start, servers


@pytest.fixture
def vllm_server_factory(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerFactory]:
    """``factory(model_dir, cpu_core=0, kv_transfer_config={...}) -> VLLMServer`` (test-scoped)."""
    start, servers = _make_factory(request, tmp_path_factory)
    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def module_vllm_server_factory(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerFactory]:
    """Like ``vllm_server_factory`` but the servers live for the whole test module."""
    start, servers = _make_factory(request, tmp_path_factory)
    yield start
    for server in servers:
        server.stop()


_REAL_VLLM_FOLDERS = ("e2e", "trust")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Everything under tests/e2e and tests/trust starts real vLLM servers: mark it ``vllm`` so
    ``make test-fast`` (``-m "not vllm"``) leaves it out."""
    for item in items:
        parts = Path(str(item.path)).relative_to(REPO_ROOT / "tests").parts
        if parts and parts[0] in _REAL_VLLM_FOLDERS:
            item.add_marker(pytest.mark.vllm)


@pytest.fixture
def closers() -> Iterator[list[Callable[[], None]]]:
    """Close callbacks a test registers; run in reverse order when it ends, pass or fail."""
    items: list[Callable[[], None]] = []
    yield items
    for close in reversed(items):
        close()
