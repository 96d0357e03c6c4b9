"""Starting and stopping local stub workers and proxies as real processes (bench and tests).

Every process is started in its own session so :meth:`Proc.stop` can end it and its children
(``--workers N`` proxies) by process group. Every wait has a deadline.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "Proc",
    "free_port",
    "free_port_pair",
    "rss_bytes",
    "start_proxy",
    "start_stub",
    "wait_http",
]


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def free_port_pair() -> int:
    """A port P such that P and P + 1 were both free a moment ago on 127.0.0.1: a KV events
    endpoint, whose snapshot socket binds P + 1 by default."""
    while True:
        port = free_port()
        if port >= 65535:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port


class Proc:
    """A child process with its log file; ``stop()`` is idempotent."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path, env: dict[str, str]) -> None:
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            list(argv), stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_text(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")
        return ""

    def stop(self, timeout: float = 5.0) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout)
        else:
            # The leader is gone; make sure no child of its group survives.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signal.SIGKILL)
        self._log.close()


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def start_stub(
    role: str, port: int, log_dir: Path, extra: Sequence[str] = (), python: str = sys.executable
) -> Proc:
    argv = [python, "-m", "lmcache_disagg.bench.stub_worker", "--port", str(port), "--role", role]
    return Proc(f"stub-{role}-{port}", [*argv, *extra], log_dir / f"stub-{role}-{port}.log", _env())


def start_proxy(
    port: int,
    prefill: Sequence[str],
    decode: Sequence[str],
    log_dir: Path,
    extra: Sequence[str] = (),
    env: dict[str, str] | None = None,
    python: str = sys.executable,
) -> Proc:
    argv = [python, "-m", "lmcache_disagg.proxy.cli", "--port", str(port)]
    for p in prefill:
        argv += ["--prefill", p]
    for d in decode:
        argv += ["--decode", d]
    full_env = _env()
    full_env.update(env or {})
    return Proc(f"proxy-{port}", [*argv, *extra], log_dir / f"proxy-{port}.log", full_env)


def wait_http(url: str, timeout: float = 20.0, proc: Proc | None = None, status: int = 200) -> None:
    """Poll ``url`` until it answers ``status``; raise TimeoutError (with the log) otherwise."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited early:\n{proc.log_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=1.0) as resp:
                if resp.status == status:
                    return
                last = f"HTTP {resp.status}"
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except OSError as exc:
            last = repr(exc)
        time.sleep(0.05)
    log = proc.log_text()[-3000:] if proc is not None else ""
    raise TimeoutError(f"{url} not answering {status} after {timeout}s (last: {last})\n{log}")


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` (Linux /proc), 0 if unknown."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0
