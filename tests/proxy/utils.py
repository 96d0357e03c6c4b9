"""Helpers for the proxy tests: stub control, proxy start-up, raw HTTP and SSE parsing."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from lmcache_disagg.bench.cluster import Proc, free_port, start_proxy, wait_http

FAST_FLAGS = ["--health-interval", "0.2", "--health-timeout", "0.5", "--log-level", "debug"]


class Stub:
    """A running stub worker and its control endpoints."""

    def __init__(self, name: str, port: int, proc: Proc) -> None:
        self.name = name
        self.port = port
        self.proc = proc
        self.addr = f"127.0.0.1:{port}"
        self.url = f"http://{self.addr}"
        self.fingerprint = f"stub-{'prefill' if name.startswith('p') else 'decode'}-{port}"

    def set(self, fault: str = "none", rate: float = 1.0, **extra: Any) -> None:
        body = {"fault": fault, "rate": rate, **extra}
        httpx.post(f"{self.url}/stub/fault", json=body, timeout=5).raise_for_status()

    def reset(self) -> None:
        self.set("none", 1.0, slow_delay=0.05, report_cached=False, model="stub-model")
        httpx.post(f"{self.url}/stub/clear", timeout=5).raise_for_status()

    def log(self) -> dict[str, Any]:
        data: dict[str, Any] = httpx.get(f"{self.url}/stub/log", timeout=5).json()
        return data

    def requests(self) -> list[dict[str, Any]]:
        reqs: list[dict[str, Any]] = self.log()["requests"]
        return reqs


class ProxyHandle:
    """A running proxy process."""

    def __init__(self, proc: Proc, port: int) -> None:
        self.proc = proc
        self.port = port
        self.addr = f"127.0.0.1:{port}"
        self.url = f"http://{self.addr}"

    def post(self, path: str, body: Any, **kw: Any) -> httpx.Response:
        """POST ``body`` (JSON-encoded unless it is raw bytes)."""
        timeout = kw.pop("timeout", 20)
        if isinstance(body, bytes):
            return httpx.post(self.url + path, content=body, timeout=timeout, **kw)
        return httpx.post(self.url + path, json=body, timeout=timeout, **kw)

    def metrics(self) -> str:
        return httpx.get(self.url + "/metrics", timeout=5).text

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels``."""
        total = 0.0
        for line in self.metrics().splitlines():
            if not line.startswith(name):
                continue
            head, _, value = line.rpartition(" ")
            metric, _, label_text = head.partition("{")
            if metric != name:
                continue
            if all(f'{k}="{v}"' in label_text for k, v in labels.items()):
                total += float(value)
        return total

    def log_text(self) -> str:
        return self.proc.log_text()


class Cluster:
    """The session's stubs plus the proxies one test starts."""

    def __init__(self, stubs: dict[str, Stub], log_dir: Path) -> None:
        self.stubs = stubs
        self.log_dir = log_dir
        self._procs: list[Proc] = []

    def __getitem__(self, name: str) -> Stub:
        return self.stubs[name]

    def proxy(
        self,
        prefill: Sequence[str] = ("p0",),
        decode: Sequence[str] = ("d0",),
        extra: Sequence[str] = (),
        env: dict[str, str] | None = None,
        wait_ready: bool = True,
    ) -> ProxyHandle:
        port = free_port()
        p_addrs = [self.stubs[p].addr if p in self.stubs else p for p in prefill]
        d_addrs = [self.stubs[d].addr if d in self.stubs else d for d in decode]
        proc = start_proxy(port, p_addrs, d_addrs, self.log_dir, [*FAST_FLAGS, *extra], env=env)
        self._procs.append(proc)
        handle = ProxyHandle(proc, port)
        if wait_ready:
            wait_http(f"{handle.url}/ready", proc=proc)
        else:
            wait_http(f"{handle.url}/health", proc=proc)
        return handle

    def stop_all(self) -> None:
        for proc in self._procs:
            proc.stop()


def completion(prompt: str = "hello world from the tests", **extra: Any) -> dict[str, Any]:
    return {"model": "stub-model", "prompt": prompt, "max_tokens": 4, **extra}


def chat(content: str = "hello from the tests", **extra: Any) -> dict[str, Any]:
    return {
        "model": "stub-model",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 4,
        **extra,
    }


def sse_events(text: str) -> list[Any]:
    """Parsed ``data:`` payloads of an SSE body (``[DONE]`` kept as the string)."""
    events: list[Any] = []
    for block in text.split("\n\n"):
        block = block.strip()
        if not block.startswith("data: "):
            continue
        payload = block[6:]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def wait_for(predicate: Any, timeout: float = 5.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def raw_request(addr: str, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes, return everything the server answers until it closes or times out."""
    host, _, port = addr.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                if b"\r\n\r\n" in b"".join(chunks) and b"content-length" in b"".join(chunks):
                    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
                    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                    if len(body) >= length:
                        break
        except TimeoutError:
            pass
    return b"".join(chunks)
