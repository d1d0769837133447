"""The package's own import graph: circles, upward imports, depth (issues #14 and #22).

    python scripts/import_graph.py              # the strict reading: every import counts
    python scripts/import_graph.py --runtime    # without the imports under `if TYPE_CHECKING:`
    python scripts/import_graph.py --load-time  # only imports that run at module import

The strict reading counts every `import`/`from ... import` of a peftcli module: at module level,
inside functions (lazy), and under `if TYPE_CHECKING:` (annotations only). A module that names
another, even only to type against it, depends on it. A package's __init__ counts as the package.
Exits 1 on a circle or an upward import.
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
READINGS = ("strict", "runtime", "load-time")
READING = next((r for r in READINGS if f"--{r}" in sys.argv), "strict")

# The stages, in the order data flows through them (README "Architecture"). A module may import
# its own stage and earlier ones, never a later one. The first prefix that matches decides.
STAGES: list[tuple[str, tuple[str, ...]]] = [
    # What every stage shares: errors and output, the tables a recipe names (tasks, objectives,
    # the method rows with their hooks, options and PEFT tuners), the run folder's file names.
    (
        "base",
        (
            "peftcli.errors",
            "peftcli.console",
            "peftcli.home",
            "peftcli.outputs",
            "peftcli.tasks",
            "peftcli.objectives",
            "peftcli.methods.table",
            "peftcli.methods.init_table",
            "peftcli.methods.hooks",
            "peftcli.methods.options",
            "peftcli.methods.tuners",
            "peftcli.run_folder.layout",
        ),
    ),
    # Reading a recipe: the schema, the file, the adapter its peft.init_from names.
    ("recipe", ("peftcli.recipe", "peftcli.recipe_file", "peftcli.methods.saved")),
    ("run folder", ("peftcli.run_folder",)),
    ("model", ("peftcli.model",)),
    ("methods", ("peftcli.methods",)),
    ("data", ("peftcli.data", "peftcli.rendering")),
    ("training", ("peftcli.training",)),
    # Each objective's class (the row and its interface, objectives/__init__ and base, are base).
    (
        "objectives",
        tuple(
            f"peftcli.objectives.{m}" for m in ("preference", "sft", "pairs", "kto", "grpo", "reference", "build")
        ),
    ),
    ("results", ("peftcli.cards",)),
    ("validation", ("peftcli.checks", "peftcli.validation")),
    ("train", ("peftcli.training.run", "peftcli.training.launch", "peftcli.training.faults")),
    (
        "use",
        (
            "peftcli.target",
            "peftcli.merging",
            "peftcli.merge_change",
            "peftcli.harness",
            "peftcli.harness_lm",
            "peftcli.export",
        ),
    ),
    # The command line: the app, the commands registered on it, and the package itself.
    (
        "commands",
        (
            "peftcli.commands",
            "peftcli.cli",
            "peftcli.cli_app",
            "peftcli.cli_train",
            "peftcli.cli_use",
            "peftcli.cli_plan",
            "peftcli",
        ),
    ),
]


def stage(module: str) -> int:
    """The index in STAGES of `module`'s stage (the longest matching prefix; the package
    `peftcli` itself only by name); -1 for a module no stage names."""
    found = [
        (len(p), i)
        for i, (_, prefixes) in enumerate(STAGES)
        for p in prefixes
        if module == p or (p != "peftcli" and module.startswith(p + "."))
    ]
    return max(found)[1] if found else -1


def resolve(name: str) -> str | None:
    """The peftcli module that `name` (a module or a name inside one) refers to."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def nodes(tree: ast.AST, reading: str):
    """Every node the reading counts: all of them (strict); not those under `if TYPE_CHECKING:`
    (runtime); nor those inside functions, which run only when called (load-time)."""
    for node in ast.iter_child_nodes(tree):
        if (
            reading != "strict"
            and isinstance(node, ast.If)
            and getattr(node.test, "id", "") == "TYPE_CHECKING"
        ):
            yield from (n for child in node.orelse for n in [child, *nodes(child, reading)])
            continue
        if reading == "load-time" and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        yield node
        yield from nodes(node, reading)


def imports(module: str, reading: str = READING) -> set[str]:
    found = set()
    for node in nodes(ast.parse(MODULES[module].read_text()), reading):
        names = []
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("peftcli"):
            names = [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("peftcli")]
        found |= {m for n in names if (m := resolve(n)) and m != module}
    return found


def graph(reading: str = READING) -> dict[str, set[str]]:
    return {m: imports(m, reading) for m in MODULES}


GRAPH = graph()


def circles(g: dict[str, set[str]] = GRAPH) -> list[list[str]]:
    seen, stack, found = set(), [], []

    def visit(m: str) -> None:
        if m in stack:
            found.append(stack[stack.index(m) :] + [m])
            return
        if m in seen:
            return
        seen.add(m)
        stack.append(m)
        for n in sorted(g[m]):
            visit(n)
        stack.pop()

    for m in sorted(g):
        visit(m)
    return found


def upward(g: dict[str, set[str]] = GRAPH) -> list[str]:
    """Imports of a later stage: `module (stage) -> imported (stage)`."""
    name = [s for s, _ in STAGES]
    return [
        f"{m} ({name[stage(m)]}) -> {n} ({name[stage(n)]})"
        for m in sorted(g)
        for n in sorted(g[m])
        if stage(n) > stage(m)
    ]


def levels(g: dict[str, set[str]] = GRAPH) -> dict[str, int]:
    """1 for a module that imports no peftcli module, else 1 + the deepest it imports (the
    graph has no circle)."""

    @cache
    def level(m: str) -> int:
        return 1 + max((level(n) for n in g[m]), default=0)

    return {m: level(m) for m in g}


if __name__ == "__main__":
    loops, up = circles(), upward()
    for loop in loops:
        print("circle:", " -> ".join(loop))
    for line in up:
        print("upward:", line)
    if loops or up:
        sys.exit(1)
    level = levels()
    by_level: dict[int, list[str]] = {}
    for m in GRAPH:
        by_level.setdefault(level[m], []).append(m)
    for lv in sorted(by_level):
        print(f"level {lv}: {', '.join(sorted(by_level[lv]))}")
    chain = [max(GRAPH, key=level.get)]
    while GRAPH[chain[-1]]:
        chain.append(max(GRAPH[chain[-1]], key=level.get))
    print(f"deepest ({READING}):", " -> ".join(chain))
    biggest = max(MODULES, key=lambda m: len(MODULES[m].read_text().splitlines()))
    print(
        f"levels: {max(by_level)}; largest module: {biggest} ({len(MODULES[biggest].read_text().splitlines())} lines)"
    )
