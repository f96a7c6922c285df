"""The package's import graph, read statically from the source (no module is imported to build it).

Every ``import`` of a guidekit module is an edge, at module level or inside a function (both are
reported; imports under ``if TYPE_CHECKING:`` never run and are left out). The graph must have no
cycle, and the math floor (``guidekit.ops``) may import nothing of guidekit but itself and
``guidekit.errors``: no strategy, sampler, backend, engine, registry or config module.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

ROOT = Path(__file__).resolve().parents[1] / "guidekit"
FLOOR = "guidekit.ops"
FLOOR_MAY_IMPORT = ("guidekit.errors",)
"""Besides its own modules, what the floor may import from guidekit (the exceptions it raises)."""

Level = Literal["module", "function"]


@dataclass(frozen=True)
class Edge:
    """``source`` imports ``target`` at ``line``, at module level or inside a function."""

    source: str
    target: str
    line: int
    level: Level

    def __str__(self) -> str:
        return f"{self.source}:{self.line} -> {self.target} ({self.level} level)"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: dict[str, Path] = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def _known(name: str) -> str | None:
    """The longest prefix of the dotted ``name`` that is a guidekit module (``a.b.func`` -> ``a.b``)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in MODULES:
            return candidate
    return None


def _targets(node: ast.Import | ast.ImportFrom, module: str) -> list[str]:
    if isinstance(node, ast.Import):
        found = (_known(alias.name) for alias in node.names if alias.name.split(".")[0] == "guidekit")
        return [t for t in found if t is not None]
    if node.level:  # relative: resolve against the importing module's package
        package = module if _is_package(module) else module.rpartition(".")[0]
        parts = package.split(".")
        base = ".".join(parts[: len(parts) - (node.level - 1)] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    if base.split(".")[0] != "guidekit":
        return []
    out = []
    for alias in node.names:  # ``from pkg import sub`` imports the submodule, ``from mod import name`` the module
        target = f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else _known(base)
        if target is not None:
            out.append(target)
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(node: ast.AST, module: str, level: Level, edges: list[Edge]) -> None:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for other in child.orelse:  # the ``else`` branch runs
                _walk(other, module, level, edges)
            continue
        if isinstance(child, ast.Import | ast.ImportFrom):
            edges.extend(Edge(module, t, child.lineno, level) for t in _targets(child, module) if t != module)
            continue
        inner: Level = "function" if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) else level
        _walk(child, module, inner, edges)


def import_edges() -> list[Edge]:
    """Every import edge between guidekit modules, read from the source files."""
    edges: list[Edge] = []
    for module, path in MODULES.items():
        _walk(ast.parse(path.read_text(encoding="utf-8"), str(path)), module, "module", edges)
    return edges


def cycles(edges: list[Edge]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for e in edges:
        graph[e.source].add(e.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _explain(component: list[str], edges: list[Edge]) -> str:
    inside = set(component)
    return "\n".join(f"  {e}" for e in edges if e.source in inside and e.target in inside)


def test_the_walk_sees_the_whole_package() -> None:
    assert {"guidekit", "guidekit.ops.spaces", "guidekit.strategies.cfg", "guidekit.energy.mappers"} <= set(MODULES)
    edges = import_edges()
    assert "guidekit.ops.guidance" in {e.target for e in edges if e.source == "guidekit.strategies.cfg"}
    assert any(e.level == "function" for e in edges)  # function-level imports are read too


def test_resolution_of_relative_and_submodule_imports() -> None:
    tree = ast.parse("from .. import errors\nfrom ..ops.shapes import append_dims\nfrom . import shapes\n")
    got = [t for node in tree.body for t in _targets(node, "guidekit.ops.spaces")]  # type: ignore[arg-type]
    assert got == ["guidekit.errors", "guidekit.ops.shapes", "guidekit.ops.shapes"]
    assert _targets(ast.parse("from .estimators import DeltaSquared").body[0], "guidekit.energy") == [  # type: ignore[arg-type]
        "guidekit.energy.estimators"
    ]


def test_no_import_cycle_at_module_level() -> None:
    edges = [e for e in import_edges() if e.level == "module"]
    found = cycles(edges)
    assert not found, "import cycles at module level:\n" + "\n".join(_explain(c, edges) for c in found)


def test_the_energy_cycle_is_gone() -> None:
    assert "guidekit.energy.base" not in MODULES  # the component bases live beside their built-ins
    mappers = {e.target for e in import_edges() if e.source == "guidekit.energy.mappers"}
    assert {"guidekit.energy.estimators", "guidekit.energy.transforms"} <= mappers
    for module in ("guidekit.energy.estimators", "guidekit.energy.transforms"):
        assert "guidekit.energy.mappers" not in {e.target for e in import_edges() if e.source == module}


def test_no_import_cycle_counting_function_level_imports() -> None:
    edges = import_edges()
    found = cycles(edges)
    assert not found, "import cycles (module and function level):\n" + "\n".join(_explain(c, edges) for c in found)


def test_the_math_floor_imports_only_itself_and_the_errors() -> None:
    floor = [e for e in import_edges() if e.source == FLOOR or e.source.startswith(FLOOR + ".")]
    assert floor, "expected the floor's modules to import one another"
    bad = [e for e in floor if not (e.target.startswith(FLOOR + ".") or e.target in FLOOR_MAY_IMPORT)]
    assert not bad, "the math floor imports strategies, samplers, backends, engine or registry:\n" + "\n".join(
        f"  {e}" for e in bad
    )


def test_the_floor_defines_each_public_name_once() -> None:
    """A name in two floor modules' ``__all__`` must be a re-import, not a second definition."""
    defined: dict[str, list[str]] = {}
    for module, path in MODULES.items():
        if not module.startswith(FLOOR + "."):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:
            names = []
            if isinstance(node, ast.FunctionDef | ast.ClassDef):
                names = [node.name]
            elif isinstance(node, ast.Assign):
                names = [t.id for t in node.targets if isinstance(t, ast.Name)]
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names = [node.target.id]
            for name in names:
                if not name.startswith("_") and name != "__all__":
                    defined.setdefault(name, []).append(module)
    twice = {name: where for name, where in defined.items() if len(where) > 1}
    assert not twice, f"defined in more than one floor module: {twice}"
