"""`peft.options` against the method's PEFT config class, read from source: the keys it takes,
their annotations, and what a recipe's value must be to fit. Part of the schema: the recipe
checks its options here while it is read, without importing PEFT (torch, transformers)."""

from __future__ import annotations

import ast
import functools
import importlib.util
import inspect
from pathlib import Path
from typing import Any

from peftcli.errors import did_you_mean
from peftcli.methods.table import Method


@functools.cache
def _class_nodes() -> dict[str, ast.ClassDef]:
    """Config class definitions of PEFT and of peftcli's own tuners, parsed — not imported
    (importing PEFT pulls in torch and transformers: seconds `peftcli validate` should not pay)."""
    paths = sorted((Path(__file__).parent / "tuners").glob("*.py"))
    spec = importlib.util.find_spec("peft")
    if spec is not None and spec.origin:
        root = Path(spec.origin).parent
        paths += [root / "config.py", *sorted(root.glob("tuners/*/config.py"))]
    nodes: dict[str, ast.ClassDef] = {}
    for path in paths:
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.ClassDef):
                nodes[node.name] = node
    return nodes


def config_fields(class_name: str) -> set[str]:
    """The keyword arguments a config class accepts."""
    nodes = _class_nodes()
    if class_name not in nodes:
        return set(inspect.signature(config_class(class_name)).parameters)
    fields: set[str] = set()
    node = nodes[class_name]
    for stmt in node.body:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            fields.add(stmt.target.id)
    for base in node.bases:
        if isinstance(base, ast.Name) and base.id in nodes:
            fields |= config_fields(base.id)
    return fields


def config_class(name: str) -> type:
    import peft

    from peftcli.methods import tuners  # noqa: F401  registers peftcli's own tuners with PEFT

    return getattr(tuners, name, None) or getattr(peft, name)


# Config fields peftcli sets from first-class recipe keys (beyond each method's `generic` ones).
_FIRST_CLASS = {
    "target_modules": "target_modules",
    "target_parameters": "target_modules",  # `experts`, `router` or a parameter's name there
    "layers_to_transform": "layers",
    "layers_pattern": "layers",
}


def config_annotations(class_name: str) -> dict[str, ast.expr]:
    """Each field's annotation, as parsed source (a base class's first, overridden by the class)."""
    nodes = _class_nodes()
    node = nodes.get(class_name)
    if node is None:
        return {}
    out: dict[str, ast.expr] = {}
    for base in node.bases:
        if isinstance(base, ast.Name) and base.id in nodes:
            out.update(config_annotations(base.id))
    for stmt in node.body:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            out[stmt.target.id] = stmt.annotation
    return out


def fits(annotation: ast.expr, value: Any) -> bool:
    """Whether `value` (as YAML gives it) fits a config field's annotation. Strict like the recipe
    (a boolean is not a number, a string not a boolean; an integer fills a float); what this cannot
    read (a library's own class, a callable) is left to the library."""
    node = annotation
    if isinstance(node, ast.Constant):
        return value is None if node.value is None else True  # None, or a forward reference
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return fits(node.left, value) or fits(node.right, value)
    if isinstance(node, ast.Name | ast.Attribute):
        name = node.id if isinstance(node, ast.Name) else node.attr
        simple = {
            "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
            "float": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
            "bool": lambda v: isinstance(v, bool),
            "str": lambda v: isinstance(v, str),
            "list": lambda v: isinstance(v, list),
            "List": lambda v: isinstance(v, list),
            "dict": lambda v: isinstance(v, dict),
            "Dict": lambda v: isinstance(v, dict),
            "tuple": lambda v: isinstance(v, list | tuple),
            "Tuple": lambda v: isinstance(v, list | tuple),
        }
        return simple[name](value) if name in simple else True
    if isinstance(node, ast.Subscript):
        outer = node.value.id if isinstance(node.value, ast.Name) else getattr(node.value, "attr", "")
        inner = list(node.slice.elts) if isinstance(node.slice, ast.Tuple) else [node.slice]
        if outer == "Optional":
            return value is None or fits(inner[0], value)
        if outer == "Union":
            return any(fits(x, value) for x in inner)
        if outer == "Literal":
            values = [x.value for x in inner if isinstance(x, ast.Constant)]
            # A pattern written as a literal ("pissa_niter_[number of iters]") takes its prefix.
            patterns = [v.split("[")[0] for v in values if isinstance(v, str) and "[" in v]
            if isinstance(value, str) and any(value.startswith(p) for p in patterns):
                return True
            return any(type(v) is type(value) and v == value for v in values)
        if outer in ("list", "List", "Sequence"):
            return isinstance(value, list) and all(fits(inner[0], v) for v in value)
        if outer in ("dict", "Dict", "Mapping"):
            return isinstance(value, dict)
        if outer in ("tuple", "Tuple"):
            return isinstance(value, list | tuple)
    return True


# peft.options keys that recipe keys own (LoraConfig fields): the key to set instead.
OWNED_OPTIONS = {
    "init_lora_weights": "peft.init",
    "use_rslora": "peft.rslora",
    "loftq_config": "peft.init: loftq",
    "eva_config": "peft.init: eva",
    "corda_config": "peft.init (CorDA is not supported)",
    "rank_pattern": "peft.rank_pattern",
    "alpha_pattern": "peft.alpha_pattern",
}


def options_problems(method: Method, options: dict[str, Any]) -> list[str]:
    """What is wrong with `peft.options` for this method: unknown keys, keys the recipe sets
    first-class (peft.r, peft.alpha, ...), values the method fixes, values of the wrong type."""
    valid = config_fields(method.config_class) - {"peft_type", "task_type"}
    first_class = {name: f"peft.{key}" for key, name in method.generic.items()}
    if method.kind == "targets":
        first_class.update({name: f"peft.{key}" for name, key in _FIRST_CLASS.items()})
    annotations = config_annotations(method.config_class)
    problems = []
    for key, value in options.items():
        if key in OWNED_OPTIONS and key in valid:
            problems.append(
                f"peft.options.{key} is set by {OWNED_OPTIONS[key]}; set that and remove peft.options.{key}"
            )
        elif key in first_class:
            problems.append(
                f"peft.options.{key} is what {first_class[key]} sets for {method.name}; "
                f"set {first_class[key]} and remove peft.options.{key}"
            )
        elif key not in valid or key == "target_modules":
            problems.append(
                f"peft.options.{key} is not an option of {method.name} ({method.config_class})"
                f"{did_you_mean(key, valid)}; valid: {', '.join(sorted(valid - {'target_modules'}))}"
            )
        elif key in method.fixed and value != method.fixed[key]:
            problems.append(f"peft.options.{key}: {method.name} sets it to {method.fixed[key]!r}")
        elif key in annotations and not fits(annotations[key], value):
            shown = {True: "true", False: "false"}[value] if isinstance(value, bool) else value
            shown = "null" if value is None else shown
            problems.append(
                f"`peft.options.{key}: {shown}` does not fit {method.config_class}.{key}, "
                f"which takes {ast.unparse(annotations[key])}"
            )
    return problems
