"""Packaging: the wheel installs only ``lmcache_disagg``, imports every subpackage, and imports
have no side effects."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SUBPACKAGES = ("proxy", "transfer", "connector", "kernels", "bench")


def _run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False, **kwargs)  # type: ignore[call-overload,no-any-return]


def test_wheel_holds_only_lmcache_disagg_and_imports_in_a_fresh_venv(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    built = _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(REPO_ROOT)],
        timeout=300,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = dist.glob("lmcache_disagg-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {
        name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")
    }
    assert top_level == {"lmcache_disagg"}, top_level
    for sub in SUBPACKAGES:
        assert f"lmcache_disagg/{sub}/__init__.py" in names

    # A fresh venv that sees the already-installed dependencies through a plain path entry
    # (not through this checkout's editable finder), then the wheel installed into it.
    venv = tmp_path / "venv"
    assert _run([sys.executable, "-m", "venv", "--without-pip", str(venv)]).returncode == 0
    site = Path(
        _run(
            [
                str(venv / "bin" / "python"),
                "-c",
                "import sysconfig; print(sysconfig.get_paths()['purelib'])",
            ]
        ).stdout.strip()
    )
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = _run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-deps", "--no-index", str(wheel)],
        timeout=300,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr[-3000:]
    probe = textwrap.dedent(
        """
        import json, lmcache_disagg.proxy, lmcache_disagg.transfer, lmcache_disagg.connector, lmcache_disagg.kernels
        print(json.dumps([m.__file__ for m in (lmcache_disagg.proxy, lmcache_disagg.kernels)]))
        """
    )
    result = _run([str(venv / "bin" / "python"), "-c", probe], cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    for path in json.loads(result.stdout.strip().splitlines()[-1]):
        assert path.startswith(str(venv)), path
    helped = _run([str(venv / "bin" / "lmcache-disagg-proxy"), "--help"], cwd=tmp_path, timeout=120)
    assert helped.returncode == 0, helped.stderr[-3000:]
    assert "--prefill" in helped.stdout


def test_no_generic_top_level_modules_are_installed() -> None:
    # `kernels` exists on PyPI and transformers probes it inside the vLLM process.
    for generic in ("proxy", "kernels", "transfer", "connector"):
        spec = _run(
            [sys.executable, "-c", f"import importlib.util as u; print(u.find_spec('{generic}'))"],
            cwd="/",
        )
        assert spec.stdout.strip() == "None", (generic, spec.stdout)


def test_imports_have_no_side_effects() -> None:
    probe = textwrap.dedent(
        """
        import threading, sys
        before = threading.active_count()
        import lmcache_disagg.proxy, lmcache_disagg.transfer, lmcache_disagg.connector, lmcache_disagg.kernels
        import lmcache_disagg.config, lmcache_disagg.kv_params, lmcache_disagg.cli
        print(threading.active_count() - before)
        """
    )
    result = _run([sys.executable, "-c", probe], cwd="/", timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "0"


def test_proxy_import_pulls_no_torch_vllm_or_nixl() -> None:
    probe = "import sys, lmcache_disagg.proxy, lmcache_disagg.config, lmcache_disagg.kv_params; print(sorted(m for m in ('torch','vllm','nixl') if m in sys.modules))"
    result = _run([sys.executable, "-c", probe], cwd="/", timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]"
