"""The layout stays walkable (issue #14): no import circle, commands depend only downward, a
method's knowledge stays in its row, files and functions stay short."""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

from .conftest import ROOT

PACKAGE = ROOT / "peftcli"
spec = importlib.util.spec_from_file_location("import_graph", ROOT / "scripts" / "import_graph.py")
graph = importlib.util.module_from_spec(spec)
spec.loader.exec_module(graph)


def sources() -> dict[Path, str]:
    return {p: p.read_text(encoding="utf-8") for p in sorted(PACKAGE.rglob("*.py"))}


def test_no_import_circle():
    assert graph.circles() == []


def test_load_time_imports_are_at_most_six_levels_deep():
    graph.LOAD_TIME = True
    try:
        load_time = {m: graph.imports(m) for m in graph.MODULES}
    finally:
        graph.LOAD_TIME = False

    def depth(m: str, seen: tuple = ()) -> int:
        return 1 + max((depth(n, (*seen, m)) for n in load_time[m] if n not in seen), default=0)

    assert max(depth(m) for m in load_time) <= 6


def test_nothing_imports_a_command():
    importers = {m for m, deps in graph.GRAPH.items() for d in deps if d.startswith("peftcli.commands.")}
    assert importers <= {"peftcli.cli"}, importers


def test_files_and_functions_stay_short():
    long = []
    for path, text in sources().items():
        if len(text.splitlines()) > 450:
            long.append(f"{path.name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                limit = 100 if node.name == "fit" else 80  # the training loop reads top to bottom
                if node.end_lineno - node.lineno + 1 > limit:
                    long.append(f"{path.name}:{node.name}")
    assert not long, long


def test_method_knowledge_stays_in_the_methods_package():
    pattern = re.compile(r"method\.name ==|\.method == \"|method == \"")
    found = [
        str(p.relative_to(ROOT))
        for p, text in sources().items()
        if "methods" not in p.relative_to(PACKAGE).parts and pattern.search(text)
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
