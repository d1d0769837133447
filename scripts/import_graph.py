"""The package's own import graph: circles, depth, and module sizes (issue #14's measures).

    python scripts/import_graph.py              # prints the layers; exits 1 on a circle
    python scripts/import_graph.py --load-time  # only imports that run at module import

Every `import`/`from ... import` of a peftcli module counts, lazy ones (inside functions) too;
those under `if TYPE_CHECKING:` (annotations only, never run) do not.
A package's __init__ counts as the package.
"""

from __future__ import annotations

import ast
import sys
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "peftcli"


def module_name(path: Path) -> str:
    parts = ["peftcli", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def resolve(name: str) -> str | None:
    """The peftcli module that `name` (a module or a name inside one) refers to."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


LOAD_TIME = "--load-time" in sys.argv  # only imports that run when the module is imported


def runtime_nodes(tree: ast.AST):
    """Every node, except those under `if TYPE_CHECKING:` (never executed) and, with
    --load-time, those inside functions (run only when the function is called)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            yield from (n for child in node.orelse for n in [child, *runtime_nodes(child)])
            continue
        if LOAD_TIME and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        yield node
        yield from runtime_nodes(node)


def imports(module: str) -> set[str]:
    found = set()
    for node in runtime_nodes(ast.parse(MODULES[module].read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("peftcli"):
            names = [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("peftcli")]
        found |= {m for n in names if (m := resolve(n)) and m != module}
    return found


GRAPH = {m: imports(m) for m in MODULES}


def circles() -> list[list[str]]:
    seen, stack, found = set(), [], []

    def visit(m: str) -> None:
        if m in stack:
            found.append(stack[stack.index(m) :] + [m])
            return
        if m in seen:
            return
        seen.add(m)
        stack.append(m)
        for n in sorted(GRAPH[m]):
            visit(n)
        stack.pop()

    for m in sorted(GRAPH):
        visit(m)
    return found


@cache
def level(m: str) -> int:
    """1 for a module that imports no peftcli module, else 1 + the deepest it imports."""
    return 1 + max((level(n) for n in GRAPH[m]), default=0)


if __name__ == "__main__":
    loops = circles()
    for loop in loops:
        print("circle:", " -> ".join(loop))
    if loops:
        sys.exit(1)
    by_level: dict[int, list[str]] = {}
    for m in GRAPH:
        by_level.setdefault(level(m), []).append(m)
    for lv in sorted(by_level):
        print(f"level {lv}: {', '.join(sorted(by_level[lv]))}")
    chain = [max(GRAPH, key=level)]
    while GRAPH[chain[-1]]:
        chain.append(max(GRAPH[chain[-1]], key=level))
    print("deepest:", " -> ".join(chain))
    biggest = max(MODULES, key=lambda m: len(MODULES[m].read_text().splitlines()))
    print(f"levels: {max(by_level)}; largest module: {biggest} ({len(MODULES[biggest].read_text().splitlines())} lines)")
