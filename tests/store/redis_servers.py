"""Real redis-server processes for tests: a single server (optionally TLS) and a 3-node cluster.

Each server binds a free loopback port, keeps nothing on disk (``--save "" --appendonly no``) and
is killed with its process on teardown, even when the test fails. Reused by the connector's
tests through the fixtures in ``tests/store/conftest.py``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

START_DEADLINE = 15.0


def free_port(bus_offset: int | None = None) -> int:
    """A free loopback port (and ``port + bus_offset`` free too, for cluster buses)."""
    for _ in range(200):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if bus_offset is None:
            return port
        if port + bus_offset < 65536:
            with socket.socket() as bus:
                try:
                    bus.bind(("127.0.0.1", port + bus_offset))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port pair")


def redis_binaries() -> tuple[str, str]:
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server is None or cli is None:
        raise RuntimeError(
            "redis-server and redis-cli must be installed (apt-get install redis-server)"
        )
    return server, cli


class RedisServer:
    """One redis-server process. ``url`` is what a client uses."""

    def __init__(
        self, workdir: Path, extra: list[str] | None = None, tls: Path | None = None
    ) -> None:
        self.server_bin, self.cli_bin = redis_binaries()
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port(10000 if extra and "--cluster-enabled" in extra else None)
        self.tls = tls
        self.extra = extra or []
        self.process: subprocess.Popen[bytes] | None = None
        self.log = self.workdir / "redis.log"

    @property
    def url(self) -> str:
        if self.tls is not None:
            return f"rediss://127.0.0.1:{self.port}?ssl_ca_certs={self.tls / 'cert.pem'}"
        return f"redis://127.0.0.1:{self.port}"

    def _args(self) -> list[str]:
        args = [self.server_bin, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        args += ["--dir", str(self.workdir), "--protected-mode", "no", "--logfile", str(self.log)]
        if self.tls is not None:
            args += ["--port", "0", "--tls-port", str(self.port)]
            args += ["--tls-cert-file", str(self.tls / "cert.pem")]
            args += ["--tls-key-file", str(self.tls / "key.pem")]
            args += ["--tls-ca-cert-file", str(self.tls / "cert.pem")]
            args += ["--tls-auth-clients", "no"]
        else:
            args += ["--port", str(self.port)]
        return args + self.extra

    def start(self) -> RedisServer:
        self.process = subprocess.Popen(
            self._args(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + START_DEADLINE
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited: {self.log_tail()}")
            if self.cli("PING", check=False).strip() == "PONG":
                return self
            time.sleep(0.05)
        raise RuntimeError(f"redis-server on {self.port} did not answer PING: {self.log_tail()}")

    def cli(self, *args: str, check: bool = True, timeout: float = 10.0) -> str:
        """Run ``redis-cli`` against this server; stdout."""
        cmd = [self.cli_bin, "-h", "127.0.0.1", "-p", str(self.port)]
        if self.tls is not None:
            cmd += ["--tls", "--cacert", str(self.tls / "cert.pem")]
        done = subprocess.run([*cmd, *args], capture_output=True, timeout=timeout, check=False)
        if check and done.returncode != 0:
            raise RuntimeError(f"redis-cli {args}: {done.stderr.decode()}")
        return done.stdout.decode()

    def cli_bytes(self, *args: bytes | str, stdin: bytes | None = None) -> bytes:
        cmd = [self.cli_bin, "-h", "127.0.0.1", "-p", str(self.port)]
        if self.tls is not None:
            cmd += ["--tls", "--cacert", str(self.tls / "cert.pem")]
        done = subprocess.run(
            [*cmd, *args], input=stdin, capture_output=True, timeout=10.0, check=True
        )
        return done.stdout

    def pause(self) -> None:
        """SIGSTOP: the server accepts nothing and answers nothing until :meth:`resume`."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)
            self.process.kill()
            self.process.wait(10)
        self.process = None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text().splitlines()[-lines:])
        except OSError:
            return "<no log>"


class RedisCluster:
    """Three master nodes, no replicas, every slot covered. ``url`` names one node."""

    def __init__(self, workdir: Path) -> None:
        self.nodes = [
            RedisServer(
                workdir / f"node{i}",
                [
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    f"nodes-{i}.conf",
                    "--cluster-node-timeout",
                    "5000",
                ],
            )
            for i in range(3)
        ]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.nodes[0].port}"

    def start(self) -> RedisCluster:
        for node in self.nodes:
            node.start()
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        self.nodes[0].cli(
            "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes",
            timeout=60.0,
        )  # fmt: skip
        deadline = time.monotonic() + START_DEADLINE * 2
        while time.monotonic() < deadline:
            if all("cluster_state:ok" in n.cli("CLUSTER", "INFO", check=False) for n in self.nodes):
                return self
            time.sleep(0.1)
        raise RuntimeError("redis cluster did not reach cluster_state:ok")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def make_tls_material(directory: Path) -> Path:
    """A self-signed certificate for 127.0.0.1/localhost (cert.pem, key.pem) in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
         "-keyout", str(directory / "key.pem"), "-out", str(directory / "cert.pem"),
         "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return directory
