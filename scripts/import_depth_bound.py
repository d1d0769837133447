"""What "at most N import levels" would cost: the fewest imports that must go (issue #22).

    python scripts/import_depth_bound.py          # the cost of each depth, 6 to today's
    python scripts/import_depth_bound.py 6        # and which imports a depth of 6 removes
    python scripts/import_depth_bound.py --flat-cli   # as if each command module held its arguments

Reads the strict import graph of `scripts/import_graph.py` (lazy and TYPE_CHECKING imports
count). An import can leave a module three ways: the caller passes the thing in, the code moves
down, or two modules become one; each removes one edge. Some edges are the design itself and
stay (`KEPT`): every module may raise the one error type; the command line registers every
command; a command calls its stage; a training run calls each stage's entry in order; the
objective builder names each objective's class; validation runs the checks. Over what is left,
an integer program (scipy's HiGHS) finds the fewest edges whose removal leaves every chain of
imports at most N modules long. That is a lower bound on the work, not a plan: it does not ask
whether an edge can go without the module above it growing past 400 lines or calling back.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

_spec = importlib.util.spec_from_file_location("import_graph", Path(__file__).with_name("import_graph.py"))
graph = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(graph)

P = "peftcli."
# The edges the design keeps, as (importer, imported); "*" is any module.
KEPT: list[tuple[str, str]] = [
    ("*", "errors"),
    *[("cli", c) for c in ("cli_train", "cli_use", "cli_plan")],
    ("cli_train", "commands.train"),
    *[("cli_use", f"commands.{c}") for c in ("eval", "generate", "merge", "export", "push")],
    *[("cli_plan", f"commands.{c}") for c in ("data", "estimate", "compare", "env")],
    ("commands.train", "training.run"),
    ("commands.compare", "training.run"),
    ("commands.merge", "merging"),
    ("commands.export", "merging"),
    *[
        ("training.run", s)
        for s in (
            "validation",
            "run_folder.lifecycle",
            "model.load",
            "methods.apply",
            "data.cache",
            "objectives.build",
            "training.loop",
            "training.checkpoint",
        )
    ],
    *[("objectives.build", f"objectives.{o}") for o in ("sft", "pairs", "kto", "grpo")],
    ("validation", "checks"),
]


def kept(module: str, imported: str) -> bool:
    m, i = module.removeprefix(P), imported.removeprefix(P)
    registers = m == "cli" and i.startswith("commands.")  # with --flat-cli
    return registers or any(a in ("*", m) and b == i for a, b in KEPT)


def flat_cli(g: dict[str, set[str]]) -> dict[str, set[str]]:
    """`g` as if the typer arguments of cli_train/cli_use/cli_plan lived in the command modules
    they call: `cli` imports the commands directly, one level less for every command."""
    shells = {P + s for s in ("cli_app", "cli_train", "cli_use", "cli_plan")}
    flat = {m: set(d) - shells for m, d in g.items() if m not in shells}
    flat[P + "cli"] |= set().union(*(g[s] for s in shells)) - shells
    return flat


def fewest_removals(g: dict[str, set[str]], depth: int) -> list[tuple[str, str]] | None:
    """The fewest edges of `g` (outside KEPT) whose removal leaves no chain longer than `depth`
    modules; None when even removing every other edge cannot."""
    modules = sorted(g)
    index = {m: i for i, m in enumerate(modules)}
    edges = [(m, d) for m in modules for d in sorted(g[m])]
    n, e = len(modules), len(edges)
    # Variables: each module's level (1..depth), then one 0/1 per edge (1: the import goes).
    # An edge that stays needs level(importer) >= level(imported) + 1; a removed one is free.
    rows = np.zeros((e, n + e))
    for k, (m, d) in enumerate(edges):
        rows[k, index[m]], rows[k, index[d]], rows[k, n + k] = 1, -1, depth
    upper = [0.0 if kept(m, d) else 1.0 for m, d in edges]
    result = milp(
        c=np.concatenate([np.zeros(n), np.ones(e)]),
        constraints=LinearConstraint(rows, lb=np.ones(e), ub=np.inf),
        integrality=np.ones(n + e),
        bounds=Bounds(np.concatenate([np.ones(n), np.zeros(e)]), np.concatenate([np.full(n, depth), upper])),
    )
    if result.status != 0:
        return None
    return [edges[k] for k in range(e) if result.x[n + k] > 0.5]


def main() -> None:
    g = flat_cli(graph.GRAPH) if "--flat-cli" in sys.argv else graph.GRAPH
    today = max(graph.levels(g).values())
    show = next((int(a) for a in sys.argv[1:] if a.isdigit()), None)
    print(f"{len(g)} modules, {sum(map(len, g.values()))} imports, {today} levels (strict reading)")
    for depth in range(6, today + 1):
        removed = fewest_removals(g, depth)
        print(
            f"  at most {depth:2d} levels: "
            + ("impossible" if removed is None else f"{len(removed)} imports removed")
        )
    if show is not None:
        for m, d in fewest_removals(g, show) or []:
            print(f"  {m.removeprefix(P)} -> {d.removeprefix(P)}")


if __name__ == "__main__":
    main()
