"""No product module uses another module's private (``_name``) names.

Checked on the source (ast) of every module of the product packages:

1. ``from m import _x`` (absolute or relative) of a first-party module ``m`` other than itself;
2. ``mod._x`` where ``mod`` is a name bound to an imported first-party module;
3. ``obj._x`` on anything but ``self``/``cls`` where ``_x`` is a private name that some *other*
   first-party module defines (a method, a class attribute or a ``self._x`` assignment) and this
   module does not: a reach into another module's objects.

Dunder names are not private. Tests and benchmarks' use of product internals is not checked here
(``lmcache_disagg/bench`` is tooling, and is checked like product code all the same).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# source directory -> package name (pyproject's package-dir)
PACKAGES = {
    "lmcache_disagg": "lmcache_disagg",
    "proxy": "lmcache_disagg.proxy",
    "transfer": "lmcache_disagg.transfer",
    "connector": "lmcache_disagg.connector",
    "kernels": "lmcache_disagg.kernels",
}
FIRST_PARTY = "lmcache_disagg"


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


@dataclass(frozen=True)
class Module:
    name: str
    path: Path
    tree: ast.Module
    is_package: bool


def _modules() -> dict[str, Module]:
    out: dict[str, Module] = {}
    for directory, package in PACKAGES.items():
        root = REPO / directory
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root).with_suffix("")
            parts = list(rel.parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            if directory == "lmcache_disagg" and parts and parts[0] in PACKAGES:
                continue
            name = ".".join([package, *parts])
            out[name] = Module(name, path, ast.parse(path.read_text(), str(path)), is_package)
    return out


def _defined_private_names(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            if _private(node.name):
                names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            if _private(node.attr):
                names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            if _private(node.id):
                names.add(node.id)
        elif (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and _private(node.target.id)
        ):
            names.add(node.target.id)
    return names


def _resolve(module: Module, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.name.split(".")
    if not module.is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def _violations(modules: dict[str, Module]) -> list[str]:
    defined = {name: _defined_private_names(m.tree) for name, m in modules.items()}
    problems: list[str] = []
    for name, module in modules.items():
        where = (
            module.path.name
            if not module.path.is_relative_to(REPO)
            else module.path.relative_to(REPO)
        )
        module_aliases: set[str] = set()
        elsewhere = set().union(*(d for other, d in defined.items() if other != name))
        mine = defined[name]
        for node in ast.walk(module.tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith(FIRST_PARTY):
                        module_aliases.add(alias.asname or alias.name.split(".")[0])
                    private_part = any(_private(part) for part in alias.name.split("."))
                    if private_part and alias.name.startswith(FIRST_PARTY):
                        problems.append(f"{where}:{node.lineno}: import {alias.name}")
            elif isinstance(node, ast.ImportFrom):
                source = _resolve(module, node)
                if not source.startswith(FIRST_PARTY):
                    continue
                for alias in node.names:
                    if f"{source}.{alias.name}" in modules:
                        module_aliases.add(alias.asname or alias.name)
                    if _private(alias.name) and source != name:
                        problems.append(f"{where}:{node.lineno}: from {source} import {alias.name}")
        for node in ast.walk(module.tree):
            if not isinstance(node, ast.Attribute) or not _private(node.attr):
                continue
            value = node.value
            if isinstance(value, ast.Name) and value.id in module_aliases:
                problems.append(f"{where}:{node.lineno}: {value.id}.{node.attr}")
                continue
            if isinstance(value, ast.Name) and value.id in ("self", "cls"):
                continue
            if isinstance(value, ast.Call) and getattr(value.func, "id", "") == "super":
                continue
            if node.attr in elsewhere and node.attr not in mine:
                problems.append(f"{where}:{node.lineno}: .{node.attr} of another module")
    return problems


def test_the_checker_sees_every_product_module() -> None:
    names = set(_modules())
    assert {
        "lmcache_disagg.cli",
        "lmcache_disagg.bench.transfer",
        "lmcache_disagg.transfer.sender",
        "lmcache_disagg.transfer.channels.tcp",
        "lmcache_disagg.connector.pusher",
        "lmcache_disagg.proxy.app",
        "lmcache_disagg.kernels.ops",
    } <= names


def test_the_checker_flags_each_kind_of_reach(tmp_path: Path) -> None:
    owner = (
        "class Peer:\n"
        "    def __init__(self):\n"
        "        self._ctl = 1\n"
        "def _helper():\n"
        "    return 1\n"
    )
    user = (
        "from lmcache_disagg.fake.owner import _helper\n"
        "from .owner import Peer\n"
        "from lmcache_disagg.fake import owner\n"
        "x = owner._helper\n"
        "def f(peer: Peer):\n"
        "    return peer._ctl\n"
        "class Mine:\n"
        "    def g(self):\n"
        "        return self._ctl\n"
    )
    modules = {
        name: Module(name, tmp_path / f"{name}.py", ast.parse(src), is_package=False)
        for name, src in (("lmcache_disagg.fake.owner", owner), ("lmcache_disagg.fake.user", user))
    }
    problems = _violations(modules)
    assert [p.split(": ", 1)[1] for p in problems] == [
        "from lmcache_disagg.fake.owner import _helper",
        "owner._helper",
        "._ctl of another module",
    ]


def test_no_cross_module_private_access() -> None:
    problems = _violations(_modules())
    assert not problems, "\n".join(problems)
