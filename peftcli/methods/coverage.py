"""What an adapter reaches, per kind of parameter: attention, MLP, fused MoE experts, router,
embeddings, head (weight matrices) and `other` (norms, biases, what lies outside the layers). `validate` works it out from the
checkpoint's headers (or, for a mixture of experts, whose experts transformers fuses when it
loads them, from the model built on the meta device), `estimate` and every run from the
wrapped model itself; the run folder keeps it as coverage.json.

A parameter is reached when the adapter changes what it computes: a LoRA, IA3, ... layer on
its module, a LoRA on the parameter itself (PEFT's `target_parameters`), or a module trained
whole (a classifier head).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftcli.methods.targets import (
    EMBEDDING_NAMES,
    HEAD_NAMES,
    ROUTER_NAMES,
    LinearIndex,
    _attention_segment,
    layer_index,
)

if TYPE_CHECKING:
    from peftcli.methods.table import Method
    from peftcli.recipe import Recipe

KINDS = ("attention", "mlp", "experts", "router", "embeddings", "head", "other")
_PARAMETRIZED = re.compile(r"\.parametrizations\.(\w+)\.original\d*$")


# --------------------------------------------------------------------------- kinds


def kind_of(
    name: str,
    shape: tuple[int, ...] | list[int],
    index: LinearIndex,
    heads: set[str] = frozenset(),
    embeddings: set[str] = frozenset(),
    moe: set[str] = frozenset(),
) -> str:
    """The kind of one base parameter (`model.layers.0.self_attn.q_proj.weight`); `moe`: the
    names of the model's `experts` modules (a router is the gate beside one)."""
    module = name.rpartition(".")[0]
    leaf = module.rpartition(".")[2]
    if name in index.experts or ".experts." in f".{name}":
        return "experts"
    if name in index.routers or (leaf in ROUTER_NAMES and f"{module.rpartition('.')[0]}.experts" in moe):
        return "router"
    if module in heads or leaf in HEAD_NAMES:
        return "head"
    if module in embeddings or leaf in EMBEDDING_NAMES:
        return "embeddings"
    if len(shape) == 1:  # norms and biases (post_attention_layernorm is no attention)
        return "other"
    if any(_attention_segment(p) for p in module.split(".")):
        return "attention"
    if layer_index(name) and len(shape) == 2:
        return "mlp"
    return "other"


def summarise(
    tensors: dict[str, tuple[int, ...]],
    kinds: dict[str, str],
    reached: set[str],
    trainable: dict[str, int],
) -> dict[str, Any]:
    """Per kind: tensors and weights in the model, and how many of them the adapter reaches."""
    out: dict[str, Any] = {}
    for kind in KINDS:
        names = [n for n in tensors if kinds[n] == kind]
        hit = [n for n in names if n in reached]
        if not names and not trainable.get(kind):
            continue
        out[kind] = {
            "tensors": len(names),
            "weights": sum(_numel(tensors[n]) for n in names),
            "reached_tensors": len(hit),
            "reached_weights": sum(_numel(tensors[n]) for n in hit),
            "trainable": trainable.get(kind, 0),
        }
    if trainable.get("virtual tokens"):
        out["virtual tokens"] = {"trainable": trainable["virtual tokens"]}
    return {
        "kinds": out,
        "reached": sorted(reached & set(tensors)),
        "trainable_params": sum(trainable.values()),
        "warnings": warnings_of(out),
    }


def _numel(shape: tuple[int, ...] | list[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def warnings_of(kinds: dict[str, Any]) -> list[str]:
    """Plain words for what a target choice leaves out that users expect it to reach."""
    experts = kinds.get("experts")
    if not experts or experts["reached_tensors"] or experts["tensors"] == 0:
        return []
    total = sum(k.get("weights", 0) for k in kinds.values())
    share = 100 * experts["weights"] / total if total else 0
    return [
        f"the adapter reaches none of the {experts['tensors']} expert tensors ({experts['weights']:,} "
        f"weights, {share:.0f}% of the model): `all-linear` means linear layers, and the experts of "
        "this mixture-of-experts model are fused parameters; add `experts` to peft.target_modules "
        "to adapt them with LoRA"
    ]


def lines(coverage: dict[str, Any]) -> list[str]:
    """The text `validate` and `estimate` print."""
    out = ["coverage (reached of the model's tensors, and weights):"]
    for kind, row in coverage["kinds"].items():
        if "tensors" not in row:
            out.append(f"  {kind:<11} trainable {row['trainable']:,}")
            continue
        train = f", trainable {row['trainable']:,}" if row["trainable"] else ""
        out.append(
            f"  {kind:<11} {row['reached_tensors']} of {row['tensors']} tensors, "
            f"{row['reached_weights']:,} of {row['weights']:,} weights{train}"
        )
    return out + [f"warning: {w}" for w in coverage["warnings"]]


# --------------------------------------------------------------------------- from a wrapped model


def of_model(peft_model: Any) -> dict[str, Any]:
    """Coverage of a PEFT-wrapped model (a real or a meta-device one)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    base = peft_model.get_base_model()
    adapter_parts: set[str] = set()
    owners: dict[str, list[str]] = {}  # tuner or wrapper module -> the base parameters it reaches
    for name, module in base.named_modules():
        if isinstance(module, BaseTunerLayer):
            adapter_parts |= set(module.adapter_layer_names) | set(module.other_param_names)
            param = getattr(module, "parameter_name", None)
            owners[name] = [f"{_clean(name)}.{param or 'weight'}"]
        elif hasattr(module, "modules_to_save") and hasattr(module, "original_module"):
            owners[name] = [f"{_clean(name)}.{p}" for p, _ in module.original_module.named_parameters()]
    tensors: dict[str, tuple[int, ...]] = {}
    trainable: dict[str, int] = {}
    index = LinearIndex.from_model(base)
    moe = {_clean(n) for n, _ in base.named_modules() if n.endswith(".experts")}
    heads = _heads(base)
    embeddings = {n for n, m in base.named_modules() if type(m).__name__.endswith("Embedding")}
    adapter_params = []
    for name, p in base.named_parameters():
        segments = set(name.split("."))
        if segments & adapter_parts or "modules_to_save" in segments or p.requires_grad:
            adapter_params.append((name, p))
            continue
        tensors[_clean(name)] = tuple(p.shape)
    kinds = {n: kind_of(n, s, index, heads, embeddings, moe) for n, s in tensors.items()}
    for name, p in adapter_params:
        if not p.requires_grad:
            continue
        owner = max((o for o in owners if name.startswith(o + ".")), key=len, default=None)
        # A trained parameter of no tuner layer (llama-adapter's gates) counts where it sits.
        reached = owners[owner][0] if owner else _clean(name)
        kind = kinds.get(reached) or kind_of(reached, tuple(p.shape), index, heads, embeddings, moe)
        trainable[kind] = trainable.get(kind, 0) + p.numel()
    virtual = sum(p.numel() for n, p in peft_model.named_parameters() if p.requires_grad) - sum(
        trainable.values()
    )
    if virtual:  # prompt embeddings and encoders live outside the base model
        trainable["virtual tokens"] = virtual
    reached = {r for rs in owners.values() for r in rs}
    return summarise(tensors, kinds, reached, trainable)


def _clean(name: str) -> str:
    """A wrapped model's parameter name as the base model has it."""
    name = _PARAMETRIZED.sub(r".\1", name)
    return ".".join(p for p in name.split(".") if p not in ("base_layer", "original_module"))


def _heads(model: Any) -> set[str]:
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {n for n, m in model.named_modules() if out is not None and m is out}


def write(path: Path, peft_model: Any) -> dict[str, Any]:
    """The run's coverage audit, written to `path` (the run folder's `coverage.json`); returns it."""
    import json

    from peftcli.outputs import write_text

    coverage = of_model(peft_model)
    write_text(path, json.dumps(coverage, indent=2) + "\n")
    return coverage


# --------------------------------------------------------------------------- for validate


def of_recipe(recipe: Recipe, folder: Path | None) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The recipe's resolved targets and what they reach, before any weight loads: from the
    checkpoint's headers, or for a mixture of experts from the model on the meta device. None
    when neither can be read."""
    from peftcli.methods import METHODS
    from peftcli.methods.apply import check_parameters, within_parts
    from peftcli.methods.targets import resolve_targets, safetensors_shapes

    method = METHODS[recipe.peft.method]
    if folder is None or method.kind != "targets":
        return None
    if LinearIndex.has_experts(folder):
        return _on_meta(recipe, method)
    index = LinearIndex.from_weights(folder)
    if index is None:
        return None
    index = within_parts(index, recipe.peft, recipe.model.task)
    targets = resolve_targets(index, recipe.peft.target_modules, recipe.peft.layers, method.default_targets)
    check_parameters(method, recipe.peft, targets)
    tensors = {k: tuple(v) for k, v in safetensors_shapes(folder).items()}
    kinds = {n: kind_of(n, s, index) for n, s in tensors.items()}
    reached = {f"{n}.weight" for n in targets["names"]}
    return targets, summarise(tensors, kinds, reached, {})


def _on_meta(recipe: Recipe, method: Method) -> tuple[dict[str, Any], dict[str, Any]]:
    """A mixture of experts: the targets of the model as transformers builds it (experts fused)."""
    import torch

    from peftcli.console import quiet_libraries
    from peftcli.methods.apply import check_parameters, within_parts
    from peftcli.methods.load import wrap_like
    from peftcli.methods.targets import resolve_targets
    from peftcli.model.load import load_config, meta_model

    quiet_libraries()
    base = meta_model(recipe.model, load_config(recipe.model), torch.float32)
    index = within_parts(LinearIndex.from_model(base), recipe.peft, recipe.model.task)
    targets = resolve_targets(index, recipe.peft.target_modules, recipe.peft.layers, method.default_targets)
    check_parameters(method, recipe.peft, targets)
    return targets, of_model(wrap_like(base, recipe.peft, recipe.model.task, total_steps=1000))
