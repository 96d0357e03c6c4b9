"""Every command in the README and docs/ is run here or checked against the real thing.

Each shell command of every fenced ``bash`` block is classified; an unknown kind fails the test, so
a new README command needs a check here. Cheap commands run for real; the rest are parsed by the
real parsers they will meet (argparse of our CLIs, our config schema, Debian's docker-compose) and
are run end to end by the tests named in ``RUN_BY``:

* ``make demo`` / ``lmcache-disagg demo --prometheus``: tests/foundation/test_demo.py;
* vLLM worker commands with our ``--kv-transfer-config`` and the proxy: tests/e2e (test_pd.py,
  test_operate.py), and their configs load with the schema here;
* ``lmcache-disagg check``: tests/e2e/test_operate.py; ``docker-compose ... up``: config -q here.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lmcache_disagg.config import LMCacheDisaggConfig, load_config
from lmcache_disagg.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
COMPOSE = shutil.which("docker-compose") or "/usr/bin/docker-compose"
# The tiered cache's keys (issue 13); docs may show them before the store is in the tree.
CACHE_KEYS = {
    "local_cpu", "max_local_cpu_size", "local_disk", "max_local_disk_size", "remote_url",
    "save_decode_cache", "save_unfull_chunk",
}  # fmt: skip
MAKE_TARGETS = {"setup", "system-deps", "demo", "test", "test-fast", "bench", "lint", "docs"}
RUN_BY = {
    "make demo": "tests/foundation/test_demo.py",
    "make test": ".ci/run",
    "lmcache-disagg demo": "tests/foundation/test_demo.py",
    "vllm worker": "tests/e2e/test_pd.py, tests/e2e/test_operate.py",
    "lmcache-disagg-proxy": "tests/e2e/test_pd.py, tests/e2e/test_operate.py",
    "lmcache-disagg check": "tests/e2e/test_operate.py",
    "docker-compose": "tests/foundation/test_compose.py (config -q)",
}


def _commands() -> list[tuple[str, str]]:
    """``(doc name, command)`` for every command line of every ``bash`` block (continuations joined)."""
    found = []
    for doc in DOCS:
        for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), re.S):
            joined = re.sub(r"\\\n\s*", " ", block)
            for line in joined.splitlines():
                line = line.split(" # ")[0].strip()
                if line and not line.startswith("#"):
                    found.append((doc.name, line))
        # The benchmark table's commands (inline code without [optional] parts).
        for inline in re.findall(r"`(lmcache-disagg bench [^`\[]+)`", doc.read_text()):
            if "..." not in inline:  # a placeholder, not a command
                found.append((doc.name, inline.strip()))
    return found


COMMANDS = _commands()


def _words(command: str) -> list[str]:
    words = shlex.split(command)
    while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):
        words.pop(0)  # VAR=value prefixes
    return words


def _help(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _flags_exist(words: list[str], help_text: str) -> None:
    for word in words:
        if word.startswith("--"):
            flag = word.split("=")[0]
            assert re.search(rf"(^|\s|\[){re.escape(flag)}\b", help_text), f"no {flag} in --help"


def _check_kv_config(words: list[str]) -> None:
    kv = json.loads(words[words.index("--kv-transfer-config") + 1])
    assert kv["kv_connector"] == "LMCacheDisaggConnector"
    assert kv["kv_connector_module_path"] == "lmcache_disagg.connector"
    assert kv["kv_role"] in ("kv_producer", "kv_consumer", "kv_both")
    extra = dict(kv.get("kv_connector_extra_config", {}))
    unknown = set(extra) - set(LMCacheDisaggConfig.model_fields)
    assert unknown <= CACHE_KEYS, f"unknown config keys {unknown}"
    for key in unknown:  # the store's keys, shown before the store is in this tree
        extra.pop(key)
    load_config(overrides=extra, environ={})


def _check(doc: str, command: str) -> str:
    """Run or check one command; return what kind it is (a key of RUN_BY, or 'checked')."""
    words = _words(command)
    head = words[0]
    if head == "make":
        assert words[1] in MAKE_TARGETS, command
        makefile = (REPO_ROOT / "Makefile").read_text()
        assert re.search(rf"^{re.escape(words[1])}:", makefile, re.M), command
        return f"make {words[1]}" if f"make {words[1]}" in RUN_BY else "checked"
    if head == "export":
        return "checked"
    if head == "curl":
        body = json.loads(words[words.index("-d") + 1])
        assert body.get("model") and "prompt" in body, command
        return "checked"
    if head == "python" and words[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]:
        _check_kv_config(words)
        return "vllm worker"
    if head == "python" and words[1:3] == ["-m", "tests.trust.soak"]:
        _flags_exist(words[3:], _help(sys.executable, "-m", "tests.trust.soak", "--help"))
        return "checked"
    if head == "lmcache-disagg-proxy":
        from lmcache_disagg.proxy.cli import build_parser, settings_from_args

        assert settings_from_args(build_parser().parse_args(words[1:])) is not None
        return "lmcache-disagg-proxy"
    if head.endswith("lmcache-disagg"):
        sub = words[1]
        if sub == "bench":
            help_text = _help(
                sys.executable, "-m", "lmcache_disagg.cli", "bench", words[2], "--help"
            )
        else:
            help_text = _help(sys.executable, "-m", "lmcache_disagg.cli", sub, "--help")
        _flags_exist(words[2:], help_text)
        if sub == "check":
            from lmcache_disagg.check import build_parser as check_parser

            check_parser().parse_args(words[2:])
            return "lmcache-disagg check"
        if sub == "config-reference":
            done = subprocess.run(
                [sys.executable, "-m", "lmcache_disagg.cli", *words[1:], "--check"],
                cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            return "checked"
        return "lmcache-disagg demo" if sub == "demo" else "checked"
    if head == "docker-compose":
        if "exec" in words:
            rest = words[words.index("exec") + 2 :]
            assert rest[0] == "lmcache-disagg", command
            return _check(doc, shlex.join(rest))
        options = words[1 : next(i for i, w in enumerate(words) if w in ("up", "config"))]
        done = subprocess.run(
            [COMPOSE, *options, "config", "-q"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            env={"PATH": "/usr/bin:/bin", "HOME": "/home/user", "MODEL": "m",
                 "LMCACHE_CLUSTER_SECRET": "s"},
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return "docker-compose"
    raise AssertionError(f"{doc}: no check for the command {command!r}: add one to {__file__}")


def test_docs_have_commands() -> None:
    docs = {doc for doc, _ in COMMANDS}
    assert {"README.md", "deploy.md", "operations.md"} <= docs


@pytest.mark.parametrize(("doc", "command"), COMMANDS, ids=[f"{d}:{c[:60]}" for d, c in COMMANDS])
def test_command(doc: str, command: str) -> None:
    kind = _check(doc, command)
    assert kind == "checked" or kind in RUN_BY


def test_config_errors_name_the_key() -> None:
    """The docs promise that an unknown key is an error naming it (troubleshooting's first row)."""
    with pytest.raises(ConfigError, match="chunk_sizes: unknown key"):
        load_config(overrides={"chunk_sizes": 1}, environ={})
