"""The package graph: which plane may import which, read from the source.

Only imports that run when a module is imported count (module level, outside
`if TYPE_CHECKING:`); an import inside a function runs when it is called, which
is how the control plane reaches heavy code without loading it at start-up.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import uff_port

PKG_ROOT = Path(uff_port.__file__).resolve().parent
HEAVY = ("torch", "transformers", "peft", "deepspeed", "bitsandbytes", "accelerate")
# Packages that must load without torch: the control plane and what it imports.
TORCH_FREE = ("core", "protocol", "server", "planner", "registry", "cloud", "campaign")
PLANES = ("server", "training", "planner", "registry", "cloud", "telemetry", "eval", "campaign")


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG_ROOT.rglob("*.py")):
        parts = list(path.relative_to(PKG_ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _top_level(body: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
    """Import statements that run at import time: module level, into if/try/with, not defs."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                yield from _top_level(node.body)
            yield from _top_level(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                yield from _top_level(block)
        elif isinstance(node, ast.With):
            yield from _top_level(node.body)


def _resolve(module: str, node: ast.Import | ast.ImportFrom) -> Iterator[str]:
    """Absolute names a statement imports (a submodule where `from pkg import sub` names one)."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            yield alias.name
        return
    if node.level:
        is_pkg = MODULES[module].name == "__init__.py"
        base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_pkg else 0)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    yield target
    for alias in node.names:
        if f"{target}.{alias.name}" in MODULES:
            yield f"{target}.{alias.name}"


def _imports(module: str) -> set[str]:
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    return {name for node in _top_level(tree.body) for name in _resolve(module, node)}


IMPORTS = {m: _imports(m) for m in MODULES}


def _loaded(name: str) -> list[str]:
    """What `import name` executes inside the package: the module and every parent package."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in MODULES]


def _closure(module: str) -> set[str]:
    """Every name imported at import time by `module`, transitively (third-party names too)."""
    seen: set[str] = set()
    todo = _loaded(module)
    external: set[str] = set()
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        for name in IMPORTS[m]:
            if name.split(".")[0] == "uff_port":
                todo.extend(_loaded(name))
            else:
                external.add(name)
    return seen | external


def _package(module: str) -> str:
    """The plane of a module: `uff_port.server.jobs` -> `server`; top-level modules are their own."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "uff_port"


def test_the_scan_sees_the_package() -> None:
    assert "uff_port.core.config" in MODULES and "uff_port.server.worker" in MODULES
    assert "uff_port.core.layout" in IMPORTS["uff_port.server.jobs"]
    # A function-level import is not an import-time edge.
    assert "uff_port.planner.guard" not in IMPORTS["uff_port.server.job_start"]


def test_torch_free_packages_never_import_torch_at_import_time() -> None:
    problems = []
    for module in MODULES:
        if _package(module) not in TORCH_FREE:
            continue
        heavy = sorted(n for n in _closure(module) if n.split(".")[0] in HEAVY)
        if heavy:
            via = sorted(m for m in _closure(module) if m in MODULES and IMPORTS[m] & set(heavy))
            problems.append(f"{module}: imports {heavy} at import time (via {via})")
    assert not problems, "\n".join(problems)


def test_core_imports_no_plane() -> None:
    problems = [
        f"{module} imports {name}"
        for module in MODULES
        if _package(module) == "core"
        for name in IMPORTS[module]
        if name.startswith("uff_port.") and _package(name) in PLANES
    ]
    assert not problems, "\n".join(problems)


def test_no_import_cycles_between_packages() -> None:
    edges: dict[str, set[str]] = {}
    for module, names in IMPORTS.items():
        src = _package(module)
        for name in names:
            if name.split(".")[0] == "uff_port" and _package(name) != src:
                edges.setdefault(src, set()).add(_package(name))
    cycles = []
    for start in edges:
        # Depth-first search for a path back to `start`.
        stack: list[tuple[str, list[str]]] = [(start, [start])]
        seen: set[str] = set()
        while stack:
            node, path = stack.pop()
            for nxt in sorted(edges.get(node, ())):
                if nxt == start:
                    cycles.append(" -> ".join([*path, start]))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
    assert not cycles, "package cycles at import time:\n" + "\n".join(sorted(set(cycles)))


def test_worker_and_cli_import_without_torch() -> None:
    code = (
        "import sys; import uff_port.server.worker, uff_port.cli; uff_port.cli.build_parser();"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]; assert not heavy, heavy"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
