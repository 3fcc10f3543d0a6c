"""Refuse import cycles among the modules of ``lightning_prune`` (exit 1 naming each, else 0).

Every module of the package is parsed with ``ast`` (nothing is imported) into a graph of which
module imports which. What counts as an import:

- every ``import`` and ``from ... import`` statement, wherever it is: at module level, inside a
  function or class (lazy imports), under ``if TYPE_CHECKING:``, in ``try``/``except``;
- relative imports, resolved against the importing module's package;
- ``from pkg import name`` imports the module ``pkg.name`` when there is one, else ``pkg``
  (its ``__init__.py``);
- importing a module runs every package ``__init__.py`` on its dotted path first, so
  ``import a.b.c`` also imports the packages ``a`` and ``a.b``; a package that contains the
  importing module is not counted that way (Python has started running it before the importer),
  but it is when an import names it (``from lightning_prune import x``, x not a submodule).

Imports of other distributions are ignored, and so are dynamic ones (entry points,
``importlib``). A cycle is a strongly connected component of more than one module, or a module
that imports itself.

Usage: ``python tools/check_imports.py [PACKAGE_DIR]`` (default: ``lightning_prune``).
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Edge:
    """One import: ``source`` imports ``target`` at ``line`` of ``path``."""

    source: str
    target: str
    path: Path
    line: int


def module_files(package_dir: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file of the package (``__init__.py`` is
    the package's own name)."""
    files = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        files[".".join(parts)] = path
    return files


def _named_modules(
    node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: dict[str, Path]
) -> list[str]:
    """The dotted names an import statement names, relative imports resolved: ``from pkg
    import name`` names the module ``pkg.name`` if there is one, else ``pkg``."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        anchor = package[: len(package) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
    members = [f"{base}.{alias.name}" for alias in node.names]
    submodules = [name for name in members if name in known]
    return submodules if len(submodules) == len(members) else [*submodules, base]


def _ancestors(name: str) -> list[str]:
    """The packages that Python runs before module ``name``: ``a``, ``a.b`` for ``a.b.c``."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def module_imports(module: str, path: Path, known: dict[str, Path]) -> list[Edge]:
    """The edges from ``module`` (file ``path``) to the package's modules it imports."""
    is_package = path.name == "__init__.py"
    running = set(_ancestors(module)) | ({module} if is_package else set())
    edges = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Import | ast.ImportFrom):
            continue
        targets = set()
        for name in _named_modules(node, module, is_package, known):
            targets |= {package for package in _ancestors(name) if package not in running}
            targets.add(name)
        edges += [Edge(module, t, path, node.lineno) for t in sorted(targets) if t in known]
    return edges


def import_graph(package_dir: Path) -> list[Edge]:
    """Every import edge among the modules of the package at ``package_dir``."""
    known = module_files(package_dir)
    return [edge for module, path in known.items() for edge in module_imports(module, path, known)]


def strongly_connected(nodes: list[str], edges: list[Edge]) -> list[list[str]]:
    """Tarjan's strongly connected components of the graph, each sorted."""
    succ: dict[str, list[str]] = {n: [] for n in nodes}
    for edge in edges:
        succ[edge.source].append(edge.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in succ[node]:
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
            components.append(sorted(component))

    for node in nodes:
        if node not in index:
            visit(node)
    return components


def find_cycles(package_dir: Path) -> list[tuple[list[str], list[Edge]]]:
    """Each import cycle of the package: its modules and the imports among them."""
    edges = import_graph(package_dir)
    nodes = sorted(module_files(package_dir))
    cycles = []
    for component in strongly_connected(nodes, edges):
        members = set(component)
        inside = [e for e in edges if e.source in members and e.target in members]
        if len(component) > 1 or inside:  # an SCC of one module is a cycle if it imports itself
            cycles.append((component, inside))
    return cycles


def main(argv: list[str]) -> int:
    package_dir = Path(argv[0]) if argv else ROOT / "lightning_prune"
    cycles = find_cycles(package_dir)
    if not cycles:
        print(f"no import cycles among {len(module_files(package_dir))} modules")
        return 0
    for number, (component, inside) in enumerate(cycles, 1):
        print(f"import cycle {number}: {', '.join(component)}")
        for edge in inside:
            where = edge.path.relative_to(package_dir.parent)
            print(f"  {edge.source} -> {edge.target}  ({where}:{edge.line})")
    return 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
