"""No import circles in ``sglctl``: every module imports alone, and the import graph is acyclic.

Two checks, because each misses what the other sees. Importing each module alone in a fresh
interpreter catches a circle that breaks at import time only for one entry order (the
``ImportError: cannot import name`` a user meets when a tool imports a submodule first). The
``ast`` scan of every ``import`` statement -- including the ones inside functions and under
``TYPE_CHECKING`` -- catches the circles that a lazy or type-only import merely hides.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import sglctl

PACKAGE_DIR = Path(sglctl.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}


def _imported(module: str, path: Path) -> set[str]:
    """The ``sglctl`` modules ``module`` imports anywhere in its source."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # ``from pkg import sub`` imports the submodule when there is one.
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                for alias in node.names
            ]
        found.update(t for t in targets if t in MODULES and t != module)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_scan_finds_a_circle() -> None:
    """The detector itself: a -> b -> a is reported, a chain is not."""
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_no_import_cycle_within_sglctl() -> None:
    graph = {name: _imported(name, path) for name, path in MODULES.items()}
    assert graph["sglctl.router.app"] >= {"sglctl.router.router", "sglctl.router.admin"}
    cycles = _cycles(graph)
    assert not cycles, "import circles in sglctl: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_router_does_not_import_the_supervisor_or_the_sim() -> None:
    for name, path in MODULES.items():
        if name.startswith("sglctl.router"):
            bad = {
                m
                for m in _imported(name, path)
                if m.startswith(("sglctl.supervisor", "sglctl.sim"))
            }
            assert not bad, f"{name} imports {bad}"
        if name.startswith("sglctl.sim"):
            bad = {m for m in _imported(name, path) if m.startswith("sglctl.router")}
            assert not bad, f"{name} imports {bad}"


#: Run in a fresh interpreter: preload the third-party libraries (never any ``sglctl``
#: module), then fork once per module, so each module is imported with no other sglctl
#: module loaded before it -- at the cost of a fork, not of a whole interpreter start.
_IMPORT_EACH = """
import importlib, os, sys
for lib in ("starlette.applications", "httpx", "uvicorn", "orjson", "numpy", "psutil",
            "prometheus_client", "typer", "rich.console", "anyio", "httptools"):
    try:
        importlib.import_module(lib)
    except ImportError:
        pass
assert not [m for m in sys.modules if m == "sglctl" or m.startswith("sglctl.")]
failed = []
for name in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(name)
        except BaseException as exc:
            print(f"{name}: {type(exc).__name__}: {exc}", flush=True)
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if status:
        failed.append(name)
sys.exit(1 if failed else 0)
"""


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_every_module_imports_alone_in_a_fresh_interpreter() -> None:
    names = [n for n in MODULES if not n.endswith("__main__")]
    result = subprocess.run(
        [sys.executable, "-c", _IMPORT_EACH, *names],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, "modules that fail to import alone:\n" + result.stdout
