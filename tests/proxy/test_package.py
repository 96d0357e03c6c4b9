"""The proxy package stays light (no torch/vLLM/NIXL), the CLI parses, and the bench runs."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import lmcache_disagg.proxy as proxy_pkg
from lmcache_disagg.errors import ConfigError
from lmcache_disagg.proxy.cli import build_parser, settings_from_args
from lmcache_disagg.proxy.settings import parse_worker_spec

MODULES = sorted(m.name for m in pkgutil.iter_modules(proxy_pkg.__path__))


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_without_heavy_deps(module: str) -> None:
    code = (
        "import sys, threading\n"
        f"import lmcache_disagg.proxy.{module}\n"
        "heavy = [m for m in ('torch', 'vllm', 'nixl', 'triton') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert threading.active_count() == 1, 'import started a thread'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_worker_spec_parsing() -> None:
    spec = parse_worker_spec("decode", "10.0.0.5:8200")
    assert (spec.http, spec.kv) == ("10.0.0.5:8200", "10.0.0.5:17555")
    spec = parse_worker_spec("decode", "10.0.0.5:8200,kv=10.0.0.6:9000")
    assert spec.kv == "10.0.0.6:9000"
    spec = parse_worker_spec("decode", "[::1]:8200")
    assert (spec.http, spec.kv) == ("[::1]:8200", "[::1]:17555")
    for bad in ("", "host", "h:0", "h:1,kv=bad", "h:1,foo=h:2", "http://h:1/v1", "h/x:1"):
        with pytest.raises(ConfigError):
            parse_worker_spec("decode", bad)
    # URLs as users copy them from vLLM's log or other routers' flags.
    spec = parse_worker_spec("decode", "http://10.0.0.5:8200/")
    assert (spec.http, spec.kv, spec.base_url) == (
        "10.0.0.5:8200",
        "10.0.0.5:17555",
        "http://10.0.0.5:8200",
    )
    assert parse_worker_spec("prefill", "HTTP://[::1]:8100").http == "[::1]:8100"
    with pytest.raises(ConfigError, match="plain HTTP"):
        parse_worker_spec("prefill", "https://h:8100")


def test_cli_settings_and_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMCACHE_PROXY_API_KEY", "k1")
    args = build_parser().parse_args(
        ["--prefill", "h:1", "--decode", "h:2,kv=h:3", "--policy", "least_loaded",
         "--local-prefill-threshold", "64", "--max-concurrency", "7", "--prefill-timeout", "3"]
    )  # fmt: skip
    settings = settings_from_args(args)
    assert settings.api_key == "k1" and "k1" not in repr(settings)
    assert settings.decode[0].kv == "h:3" and settings.policy == "least_loaded"
    assert settings.local_prefill_threshold == 64 and settings.max_concurrency == 7
    assert settings.timeouts.prefill == 3
    bad = subprocess.run(
        [sys.executable, "-m", "lmcache_disagg.proxy.cli", "--decode", "nope"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 2 and "host:port" in bad.stderr
    cfg = tmp_path / "c.yaml"
    cfg.write_text("decode_instances:\n  - http: h:1\n    bogus: 1\n")
    bad = subprocess.run(
        [sys.executable, "-m", "lmcache_disagg.proxy.cli", "--config", str(cfg)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 2 and "bogus" in bad.stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--port", "80000"], "port must be 0-65535"),
        (["--prefill-timeout", "-1"], "prefill timeout must be > 0"),
        (["--prefill-attempts", "0"], "prefill_attempts must be >= 1"),
        (["--host", "192.0.2.1"], "cannot listen on 192.0.2.1:"),  # TEST-NET-1: never local
    ],
)
def test_bad_settings_exit_2_with_a_message_not_a_traceback(flags: list[str], message: str) -> None:
    bad = subprocess.run(
        [sys.executable, "-m", "lmcache_disagg.proxy.cli", "--prefill", "127.0.0.1:1",
         "--decode", "127.0.0.1:2", "--port", "0", *flags],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 2, bad.stderr
    assert message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


def test_port_in_use_is_a_clear_error() -> None:
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = str(taken.getsockname()[1])
        bad = subprocess.run(
            [sys.executable, "-m", "lmcache_disagg.proxy.cli", "--prefill", "127.0.0.1:1",
             "--decode", "127.0.0.1:2", "--port", port],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert bad.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in bad.stderr, bad.stderr


def test_bench_json_smoke() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "lmcache_disagg.cli", "bench", "proxy", "--json", "--requests",
         "200", "--warmup", "20", "--rounds", "1", "--proxy-workers", "1", "--no-router"],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for mode in ("non_stream", "stream"):
        row = result["results"][mode]["lmcache-disagg-proxy (workers=1)"]
        assert row["req_per_s"] > 0 and row["non_200"] == 0


def test_console_script_help() -> None:
    script = Path(sys.executable).parent / "lmcache-disagg-proxy"
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for flag in ("--prefill", "--decode", "--policy", "--local-prefill-threshold", "--workers",
                 "--max-concurrency", "--admin-key", "--kv-probe"):  # fmt: skip
        assert flag in out.stdout
