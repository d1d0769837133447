"""The layout stays walkable (issues #14, #22): no import circle and no stage importing a later one
(on the strict reading: lazy and TYPE_CHECKING imports count), commands depend only downward, a
method's and an objective's knowledge stay in their rows, one module names the run folder's files,
files and functions stay short."""

from __future__ import annotations

import ast
import importlib.util
import io
import re
import tokenize
from pathlib import Path

from .conftest import ROOT

PACKAGE = ROOT / "peftcli"
spec = importlib.util.spec_from_file_location("import_graph", ROOT / "scripts" / "import_graph.py")
graph = importlib.util.module_from_spec(spec)
spec.loader.exec_module(graph)
spec = importlib.util.spec_from_file_location(
    "import_depth_bound", ROOT / "scripts" / "import_depth_bound.py"
)
bound = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bound)


def sources() -> dict[Path, str]:
    return {p: p.read_text(encoding="utf-8") for p in sorted(PACKAGE.rglob("*.py"))}


# The strict reading: every import counts, lazy ones (inside functions) and those under
# `if TYPE_CHECKING:` too (issue #22): a module that names another depends on it.


def test_no_import_circle():
    assert graph.circles(graph.graph("strict")) == []


def test_no_stage_imports_a_later_stage():
    assert graph.upward(graph.graph("strict")) == []


def test_every_module_has_a_stage():
    assert all(graph.stage(m) >= 0 for m in graph.MODULES)


def test_load_time_imports_are_at_most_six_levels_deep():
    levels = graph.levels(graph.graph("load-time"))
    assert max(levels.values()) <= 6, sorted(levels.items(), key=lambda kv: -kv[1])[:3]


def test_depth_bound_removes_the_fewest_imports_and_keeps_the_design():
    """scripts/import_depth_bound.py (what a depth cap would cost, issue #22): on a toy graph its
    answer is the known optimum; on the package, removing what it names reaches the depth asked."""
    p = "peftcli."
    chain = {p + "a": {p + "b"}, p + "b": {p + "c"}, p + "c": {p + "errors"}, p + "errors": set()}
    assert bound.fewest_removals(chain, 4) == []
    # At most 2: `c -> errors` is kept (anything may raise the error); removing a -> b leaves
    # b -> c -> errors (3), removing b -> c leaves a -> b and c -> errors (2 each): that one.
    assert bound.fewest_removals(chain, 2) == [(p + "b", p + "c")]
    kept_only = {p + "cli": {p + "cli_train"}, p + "cli_train": {p + "errors"}, p + "errors": set()}
    assert bound.fewest_removals(kept_only, 2) is None
    strict = graph.graph("strict")
    removed = bound.fewest_removals(strict, 10)
    assert removed and not any(bound.kept(m, d) for m, d in removed)
    pruned = {m: deps - {d for n, d in removed if n == m} for m, deps in strict.items()}
    assert max(graph.levels(pruned).values()) <= 10


def test_nothing_imports_a_command():
    strict = graph.graph("strict")
    importers = {m for m, deps in strict.items() for d in deps if d.startswith("peftcli.commands.")}
    command_line = {m for m in importers if m.startswith(("peftcli.cli", "peftcli.commands."))}
    assert importers <= command_line, importers


def test_files_and_functions_stay_short():
    long = []
    for path, text in sources().items():
        if len(text.splitlines()) > 400:
            long.append(f"{path.name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if node.end_lineno - node.lineno + 1 > 80:
                    long.append(f"{path.name}:{node.name}")
    assert not long, long


# The run folder's names (peftcli/run_folder/layout.py). A string constant equal to one of them,
# or a path joined with one (`folder / "adapter"`), anywhere else spells a run file's name again.
RUN_NAMES = {
    "recipe.yaml",
    "metrics.jsonl",
    "eval.json",
    "loss.png",
    "reference.safetensors",
    ".incomplete",
    "labels.json",
    "state.json",
    "adapter_config.json",
    "adapter_model.safetensors",
}
JOINED_NAMES = RUN_NAMES | {"adapter", "checkpoints"}
# The data cache's entry (peftcli/data/cache.py) has a labels.json of its own, in its own folder.
OTHER_FOLDERS = {("peftcli/data/cache.py", "labels.json")}


def test_only_the_layout_spells_a_run_file_name():
    found = []
    for path, text in sources().items():
        where = str(path.relative_to(ROOT))
        if where == "peftcli/run_folder/layout.py":
            continue
        for node in ast.walk(ast.parse(text)):
            name = None
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
                right = node.right
                if isinstance(right, ast.Constant) and right.value in JOINED_NAMES:
                    name = right.value
                elif isinstance(right, ast.JoinedStr) and "step-" in ast.unparse(right):
                    name = ast.unparse(right)
            elif isinstance(node, ast.Constant) and node.value in RUN_NAMES:
                name = node.value
            elif (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and node.value.startswith("step-")
            ):
                name = node.value
            if name and (where, name) not in OTHER_FOLDERS:
                found.append(f"{where}:{node.lineno}: {name}")
    assert not found, sorted(set(found))


def test_method_knowledge_stays_in_the_methods_package():
    pattern = re.compile(r"method\.name ==|\.method == \"|method == \"")
    found = [
        str(p.relative_to(ROOT))
        for p, text in sources().items()
        if "methods" not in p.relative_to(PACKAGE).parts and pattern.search(text)
    ]
    assert not found, found


def objective_name_tests(tree: ast.AST, names: set[str]) -> list[int]:
    """Lines comparing something with an objective's name: `== "dpo"`, `!= "sft"`,
    `in ("dpo", "kto")`, either side."""

    def named(node: ast.expr) -> bool:
        if isinstance(node, ast.Constant):
            return node.value in names
        return isinstance(node, (ast.Tuple, ast.List, ast.Set)) and any(named(e) for e in node.elts)

    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Compare) and any(named(x) for x in [node.left, *node.comparators])
    ]


def test_objective_knowledge_stays_in_the_objectives_package():
    """What differs between objectives is read from their rows (objectives.OBJECTIVES) or done
    by their classes; no module elsewhere asks which objective it has (issue #22)."""
    from peftcli.objectives import OBJECTIVES

    assert objective_name_tests(ast.parse('x = o in ("dpo", "kto") or "sft" != o'), set(OBJECTIVES)) == [1, 1]
    found = [
        f"{p.relative_to(ROOT)}:{line}"
        for p, text in sources().items()
        if "objectives" not in p.relative_to(PACKAGE).parts
        for line in objective_name_tests(ast.parse(text), set(OBJECTIVES))
    ]
    assert not found, found


def test_one_definition_of_the_ignore_label_and_the_task_table():
    defined = {
        name: [
            str(p.relative_to(ROOT))
            for p, text in sources().items()
            if re.search(rf"^{name}(: [^=]+)? = ", text, re.M)
        ]
        for name in ("IGNORE", "TASKS", "AUTO_CLASSES", "TASK_TYPES")
    }
    assert defined == {
        "IGNORE": ["peftcli/tasks.py"],
        "TASKS": ["peftcli/tasks.py"],
        "AUTO_CLASSES": [],
        "TASK_TYPES": [],
    }


# Issue #21: a tolerance is derived from the computation (dtype, summed terms, optimizer steps),
# never tuned to one CPU, so each states its reason beside it. Keyword arguments of any call:
# pytest.approx, torch.allclose, torch.testing.assert_close, math.isclose.
TOLERANCE_KEYWORDS = {"rel", "abs", "atol", "rtol", "abs_tol", "rel_tol"}
REASON_WINDOW = 3  # comment-only lines above the statement (or the call) that may hold the reason


def comment_lines(text: str) -> tuple[set[int], set[int]]:
    """Lines holding a `#` comment, and those holding nothing but a comment."""
    tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    commented = {t.start[0] for t in tokens if t.type == tokenize.COMMENT}
    layout = (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT)
    code = {line for t in tokens if t.type not in layout for line in range(t.start[0], t.end[0] + 1)}
    return commented, commented - code


def needs_reason(value: ast.expr) -> list[str]:
    """The UPPER_CASE names in a tolerance's value, [""] for a non-zero literal alone, [] for 0."""
    upper = [n.id for n in ast.walk(value) if isinstance(n, ast.Name) and n.id.isupper()]
    literal = any(
        isinstance(n, ast.Constant) and type(n.value) in (int, float) and n.value != 0
        for n in ast.walk(value)
    )
    return upper or ([""] if literal else [])


def module_constants(tree: ast.Module) -> dict[str, tuple[int, int]]:
    """Module-level UPPER_CASE assignments: name -> (first line, last line)."""
    found = {}
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name) and name.id.isupper():
                        found[name.id] = (node.lineno, node.end_lineno)
    return found


def has_reason(commented: set[int], comment_only: set[int], first: int, last: int, above: int) -> bool:
    """A comment on lines first..last, or comment-only lines among the `above` lines before."""
    return bool(commented & set(range(first, last + 1)) or comment_only & set(range(first - above, first)))


def test_every_tolerance_gives_its_reason():
    """A tolerance keyword whose value is a non-zero number or an UPPER_CASE constant has a
    comment on its statement or in the comment lines just above; the constant's definition too."""
    parsed = {}
    for path in sorted((ROOT / "tests").glob("*.py")):
        text = path.read_text(encoding="utf-8")
        parsed[path.stem] = (ast.parse(text), text, *comment_lines(text))
    offenders, constants = [], set()
    for stem, (tree, text, commented, comment_only) in parsed.items():
        statement = {}  # each node's innermost enclosing statement
        for node in ast.walk(tree):
            for child in ast.iter_child_nodes(node):
                statement[child] = child if isinstance(child, ast.stmt) else statement.get(node, node)
        imported = {
            a.asname or a.name: n.module
            for n in ast.walk(tree)
            if isinstance(n, ast.ImportFrom)
            for a in n.names
        }
        for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
            first = min(call.lineno, statement[call].lineno)
            for kw in call.keywords:
                if kw.arg not in TOLERANCE_KEYWORDS or not (names := needs_reason(kw.value)):
                    continue
                if not has_reason(commented, comment_only, first, call.end_lineno, REASON_WINDOW):
                    value = ast.get_source_segment(text, kw.value)
                    offenders.append(
                        (f"tests/{stem}.py", kw.value.lineno, f"{kw.arg}={value} without a reason")
                    )
                for name in filter(None, names):  # defined here, or imported from a sibling test file
                    constants.add((name, (imported.get(name) or stem).rpartition(".")[2]))
    for name, stem in sorted(constants):
        tree, _, commented, comment_only = parsed.get(stem, (None, "", set(), set()))
        first, last = module_constants(tree).get(name, (0, 0)) if tree else (0, 0)
        if not first:
            offenders.append((f"tests/{stem}.py", 0, f"{name} is used as a tolerance but not defined here"))
        elif not has_reason(commented, comment_only, first, last, 1):  # a comment block ending just above
            offenders.append((f"tests/{stem}.py", first, f"{name} is defined without its reason"))
    assert not offenders, "tolerances without a reason beside them:\n" + "\n".join(
        f"{path}:{line}: {what}" for path, line, what in sorted(offenders)
    )
