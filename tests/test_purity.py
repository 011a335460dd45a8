"""translators/ is the pure core: nothing in it may reach the kernel, the network or a process.

Checked two ways: statically (every import statement of every module, and no
call of os.system/os.popen/exec*/spawn*), and dynamically (importing every
module in a fresh interpreter loads none of the side-effect modules).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

TRANSLATORS = Path(__file__).resolve().parent.parent / "translators"
MODULES = sorted(p for p in TRANSLATORS.glob("*.py"))

FORBIDDEN = {
    "nftables",
    "pyroute2",
    "ctypes",
    "subprocess",
    "socket",
    "multiprocessing",
    "threading",
    "asyncio",
    "http",
    "urllib",
    "requests",
    "shutil",
    "signal",
    "select",
    "fcntl",
    "pty",
    "nftsg.agent",
}
FORBIDDEN_OS_CALLS = {"system", "popen", "fork", "kill", "remove", "unlink", "setns"}


def _imports(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
        elif isinstance(node, ast.ImportFrom) and node.level > 1:
            names.add("." * node.level + (node.module or ""))  # reaches outside the package
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "__import__"
        ):
            names.add("__import__")
    return names


def _is_forbidden(name: str) -> bool:
    if name.startswith("..") or name in ("__import__", "importlib"):
        return True
    return any(name == f or name.startswith(f + ".") for f in FORBIDDEN)


def test_there_are_modules_to_check() -> None:
    assert {"nft.py", "compiler.py", "diff.py", "network.py"} <= {p.name for p in MODULES}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_module_imports_nothing_with_side_effects(path: Path) -> None:
    tree = ast.parse(path.read_text(), filename=str(path))
    bad = sorted(n for n in _imports(tree) if _is_forbidden(n))
    assert bad == [], f"{path.name} imports {bad}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if node.value.id == "os" and (
                node.attr in FORBIDDEN_OS_CALLS or node.attr.startswith(("exec", "spawn"))
            ):
                pytest.fail(f"{path.name} uses os.{node.attr}")


def test_the_checker_notices_a_forbidden_import() -> None:
    tree = ast.parse("import os\nfrom pyroute2 import IPRoute\nfrom .. import agent\n")
    assert sorted(n for n in _imports(tree) if _is_forbidden(n)) == ["..", "pyroute2"]


def test_importing_every_module_loads_no_side_effect_module() -> None:
    """Against a baseline of the allowed third-party dependencies: building any
    pydantic model imports `socket`, `select` and `shutil` (pydantic's own
    internals, unused); the core may add no forbidden module of its own, and
    the kernel- and process-facing ones may never be loaded at all."""
    names = [f"nftsg.translators.{p.stem}" for p in MODULES if p.stem != "__init__"]
    watched = [*sorted(f for f in FORBIDDEN if "." not in f), "nftsg.agent"]
    code = (
        "import importlib, json, sys\n"
        "import pydantic, yaml\n"
        "from pydantic import BaseModel\n"
        "class _Baseline(BaseModel):\n    x: dict[str, str] = {}\n"
        f"w = {watched!r}\n"
        "base = sorted(m for m in w if m in sys.modules)\n"
        f"for n in {names!r}: importlib.import_module(n)\n"
        "print(json.dumps([base, sorted(m for m in w if m in sys.modules)]))\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    base, after = json.loads(res.stdout)
    assert after == base
    never = {"nftables", "pyroute2", "ctypes", "subprocess", "nftsg.agent"}
    assert never & set(after) == set()
