#!/usr/bin/env python
"""Which module of the piip_llava package imports which, read from the source with `ast` (nothing is imported).

    python scripts/package_imports.py            # the mermaid diagram of docs/architecture.md
    python scripts/package_imports.py --cycles   # import cycles between the package's modules, if any

The diagram groups modules by part (`models.piip`, `training`, `commands`, ...; a top-level module is its own
part) and draws an arrow from a part to each part it imports from. tests/package/test_package_layout.py checks
that docs/architecture.md shows exactly this diagram, that the package has no import cycle and that it imports
nothing from the demo recipe, the scripts or the benchmarks.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "piip_llava"
# Parts shown as one box: a subpackage of the package, or `models.<family>`.
GROUPED_PACKAGES = ("models",)


def module_name(path: Path, package_dir: Path) -> str:
    """`piip_llava/models/piip/modeling_piip.py` -> `piip_llava.models.piip.modeling_piip`; a package is its `__init__`."""
    parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules(package_dir: Path) -> dict[str, Path]:
    """Every module of the package by dotted name."""
    return {module_name(path, package_dir): path for path in sorted(package_dir.rglob("*.py"))}


def imported_names(path: Path, module: str) -> list[tuple[str, int]]:
    """(absolute module name, line) of every import statement in the file, relative ones resolved.

    `from a.b import c` counts as an import of `a.b.c` when that is a module, else of `a.b`; the caller decides.
    """
    is_package = path.name == "__init__.py"
    # The package a relative import starts from: the module itself when it is a package's __init__.
    base = module.split(".") if is_package else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                source = ".".join([*anchor, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            found.extend((f"{source}.{alias.name}", node.lineno) for alias in node.names)
            found.append((source, node.lineno))
    return found


def import_graph(package_dir: Path = REPO / PACKAGE) -> dict[str, set[str]]:
    """module -> the package's modules it imports (at module level or inside functions)."""
    modules = package_modules(package_dir)
    graph = {}
    for module, path in modules.items():
        targets = set()
        for name, _ in imported_names(path, module):
            if name in modules and name != module:
                targets.add(name)
        graph[module] = targets
    return graph


def outside_imports(package_dir: Path = REPO / PACKAGE, forbidden: tuple[str, ...] = ()) -> list[str]:
    """`file:line name` for every import in the package of a top-level name in `forbidden`."""
    found = []
    for module, path in package_modules(package_dir).items():
        for name, line in imported_names(path, module):
            if name.split(".")[0] in forbidden:
                found.append(f"{path.relative_to(package_dir.parent)}:{line} {name}")
    return sorted(set(found))


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm): each is an import cycle."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in sorted(graph.get(module, ())):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph)))
    for module in sorted(graph):
        if module not in index:
            visit(module)
    return components


def part(module: str) -> str:
    """The box a module is drawn in: `piip_llava.models.piip.branches` -> `models.piip`, `piip_llava.flops` -> `flops`."""
    parts = module.split(".")[1:]
    if not parts:
        return PACKAGE
    if parts[0] in GROUPED_PACKAGES and len(parts) > 1:
        return ".".join(parts[:2])
    return parts[0]


def part_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The import graph between parts, without a part's imports of itself."""
    parts: dict[str, set[str]] = {}
    for module, targets in graph.items():
        source = part(module)
        if source in GROUPED_PACKAGES:  # `piip_llava.models`' own __init__ only re-exports its families
            continue
        edges = parts.setdefault(source, set())
        edges.update(part(target) for target in targets if part(target) not in (source, *GROUPED_PACKAGES))
    return parts


def mermaid(graph: dict[str, set[str]]) -> str:
    """The part graph as a mermaid flowchart, one line per arrow, sorted so that it is stable."""
    parts = part_graph(graph)
    lines = ["flowchart LR"]
    for source in sorted(parts):
        node = source.replace(".", "_")
        if not parts[source]:
            lines.append(f"    {node}[{source}]")
        for target in sorted(parts[source]):
            lines.append(f"    {node}[{source}] --> {target.replace('.', '_')}[{target}]")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", action="store_true", help="list import cycles instead of drawing the diagram")
    args = parser.parse_args(argv)
    graph = import_graph()
    if args.cycles:
        cycles = import_cycles(graph)
        for cycle in cycles:
            print(" <-> ".join(cycle))
        return 1 if cycles else 0
    print(mermaid(graph))
    return 0


if __name__ == "__main__":
    sys.exit(main())
