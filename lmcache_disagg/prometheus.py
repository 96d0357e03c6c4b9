"""A real Prometheus server as a child process, and the Grafana dashboard's queries (torch-free).

Used by ``lmcache-disagg demo --prometheus`` and the tests: it scrapes the given targets every
second from a generated config, and :func:`dashboard_queries` lists every PromQL expression of
every panel of ``docker/grafana/dashboards/lmcache-disagg.json``.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx

from lmcache_disagg.errors import LMCacheDisaggError
from lmcache_disagg.vllm_server import free_port

__all__ = ["DASHBOARD", "PrometheusError", "PrometheusServer", "dashboard_queries", "has_data"]

DASHBOARD = (
    Path(__file__).resolve().parents[1]
    / "docker"
    / "grafana"
    / "dashboards"
    / "lmcache-disagg.json"
)


class PrometheusError(LMCacheDisaggError, RuntimeError):
    """Prometheus is not installed, exited, or did not become ready before its deadline."""


def dashboard_queries(path: Path = DASHBOARD) -> list[tuple[str, str]]:
    """``(panel title, PromQL)`` for every target of every panel."""
    dashboard = json.loads(path.read_text())
    return [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]


def has_data(result: list[dict[str, Any]]) -> bool:
    """At least one finite sample (a quantile of an empty window is NaN: no data)."""
    return any(math.isfinite(float(sample["value"][1])) for sample in result)


class PrometheusServer:
    """``prometheus`` on a free loopback port scraping ``targets`` (job -> ``host:port``) every 1s."""

    def __init__(self, targets: dict[str, str], work: Path, binary: str = "prometheus") -> None:
        found = shutil.which(binary)
        if found is None:
            raise PrometheusError(f"{binary} is not installed (Debian: apt-get install prometheus)")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        work.mkdir(parents=True, exist_ok=True)
        config = work / "prometheus.yml"
        jobs = "".join(
            f"  - job_name: {job}\n    static_configs: [{{targets: ['{target}']}}]\n"
            for job, target in targets.items()
        )
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n" + jobs
        )
        self.log_path = work / "prometheus.log"
        self._log = self.log_path.open("wb")
        self._process = subprocess.Popen(
            [
                found, f"--config.file={config}", f"--storage.tsdb.path={work / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip

    def _log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-2000:]

    def wait_ready(self, deadline_s: float = 60.0) -> PrometheusServer:
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise PrometheusError(f"prometheus exited: {self._log_tail()}")
            try:
                if httpx.get(self.url + "/-/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise PrometheusError(f"prometheus not ready after {deadline_s}s: {self._log_tail()}")

    def wait_targets_up(self, deadline_s: float = 60.0) -> None:
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            reply = httpx.get(self.url + "/api/v1/targets", timeout=5).json()
            active = reply["data"]["activeTargets"]
            if active and all(t["health"] == "up" for t in active):
                return
            time.sleep(0.5)
        raise PrometheusError(f"targets not up after {deadline_s}s: {self.query('up')}")

    def query(self, expr: str) -> list[dict[str, Any]]:
        reply = httpx.get(self.url + "/api/v1/query", params={"query": expr}, timeout=10).json()
        if reply.get("status") != "success":
            raise PrometheusError(f"query {expr!r} failed: {reply}")
        result: list[dict[str, Any]] = reply["data"]["result"]
        return result

    def answered(
        self, queries: list[tuple[str, str]], deadline_s: float
    ) -> tuple[set[str], dict[str, str]]:
        """Poll until every query has data or the deadline passes: (answered, {expr: title})."""
        pending = {expr: title for title, expr in queries}
        answered: set[str] = set()
        deadline = time.monotonic() + deadline_s
        while pending:
            for expr in list(pending):
                if has_data(self.query(expr)):
                    answered.add(expr)
                    del pending[expr]
            if not pending or time.monotonic() >= deadline:
                break
            time.sleep(1.0)
        return answered, pending

    def stop(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=10)
        self._log.close()

    def __enter__(self) -> PrometheusServer:
        return self.wait_ready()

    def __exit__(self, *exc: object) -> None:
        self.stop()
