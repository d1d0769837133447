"""PEFT methods: one table from `peft.method` to its PEFT config, and target-module resolution.

The table itself imports nothing heavy, so the recipe schema and `peftcli methods` stay fast;
`apply_method` imports PEFT when it runs.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UserError, did_you_mean
from .targets import LinearIndex, resolve_targets

if TYPE_CHECKING:
    import torch.nn as nn

    from .recipe import PeftSection


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    config_class: str  # attribute of the `peft` package
    merges: bool  # can the adapter be folded into the base weights?
    fixed: dict[str, Any] = field(default_factory=dict)  # config kwargs the method implies
    default_targets: str = "all-linear"


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("lora", "low-rank update B·A added to target linears", "LoraConfig", merges=True),
        Method(
            "qlora",
            "LoRA on a 4-bit NF4 base (implies model.quantization: 4bit)",
            "LoraConfig",
            merges=True,
        ),
        Method(
            "dora", "weight-decomposed LoRA (magnitude + direction)", "LoraConfig", True, {"use_dora": True}
        ),
    ]
}

# The recipe's generic keys and the name each config class gives them.
_GENERIC_KEYS = {"LoraConfig": {"r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout"}}

TASK_TYPES = {"causal_lm": "CAUSAL_LM", "seq2seq_lm": "SEQ_2_SEQ_LM", "seq_cls": "SEQ_CLS"}


def canonical_method(name: str) -> str:
    return name.strip().lower().replace("_", "-")


# --------------------------------------------------------------------------- configs


@functools.cache
def _class_nodes() -> dict[str, ast.ClassDef]:
    """Class definitions in PEFT's config modules, parsed — not imported (importing PEFT
    pulls in torch and transformers, seconds that `peftcli validate` should not pay)."""
    spec = importlib.util.find_spec("peft")
    if spec is None or not spec.origin:
        return {}
    root = Path(spec.origin).parent
    nodes: dict[str, ast.ClassDef] = {}
    for path in [root / "config.py", *sorted(root.glob("tuners/*/config.py"))]:
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.ClassDef):
                nodes[node.name] = node
    return nodes


def config_fields(class_name: str) -> set[str]:
    """The keyword arguments a PEFT config class accepts."""
    nodes = _class_nodes()
    if class_name not in nodes:
        import peft

        return set(inspect.signature(getattr(peft, class_name)).parameters)
    fields: set[str] = set()
    node = nodes[class_name]
    for stmt in node.body:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            fields.add(stmt.target.id)
    for base in node.bases:
        if isinstance(base, ast.Name) and base.id in nodes:
            fields |= config_fields(base.id)
    return fields


def config_kwargs(method: Method, section: PeftSection) -> dict[str, Any]:
    """The keyword arguments the recipe gives the method's PEFT config (targets excluded)."""
    valid = config_fields(method.config_class) - {"peft_type", "task_type", "target_modules"}
    generic = _GENERIC_KEYS.get(method.config_class, {})
    kwargs = {peft_key: getattr(section, key) for key, peft_key in generic.items()}
    for key, value in section.options.items():
        if key not in valid:
            raise UserError(
                f"peft.options.{key} is not an option of {method.name} ({method.config_class})"
                f"{did_you_mean(key, valid)}; valid: {', '.join(sorted(valid))}"
            )
        if key in method.fixed and value != method.fixed[key]:
            raise UserError(f"peft.options.{key}: {method.name} sets it to {method.fixed[key]!r}")
        kwargs[key] = value
    kwargs.update(method.fixed)
    return kwargs


def apply_method(model: nn.Module, section: PeftSection, task: str) -> Any:
    """Wrap `model` with the recipe's PEFT method; returns the PeftModel."""
    from peft import get_peft_model

    method = METHODS[section.method]
    targets = resolve_targets(
        LinearIndex.from_model(model), section.target_modules, section.layers, method.default_targets
    )
    targets.pop("names")
    import peft

    cls = getattr(peft, method.config_class)
    kwargs = config_kwargs(method, section)
    try:
        config = cls(task_type=TASK_TYPES[task], **targets, **kwargs)
    except (TypeError, ValueError) as exc:
        raise UserError(f"peft ({method.name}): {exc}") from None
    return get_peft_model(model, config)
