"""Putting a method on a model: refusals before weights load (`check_fit`), the recipe's
config keywords (`config_kwargs`), and `apply_method`, which imports PEFT when it runs.
"""

from __future__ import annotations

import functools
import inspect
from typing import TYPE_CHECKING, Any

from peftcli.errors import UserError
from peftcli.methods import inits
from peftcli.methods.hooks import Context
from peftcli.methods.options import config_class, options_problems
from peftcli.methods.table import METHODS, Method
from peftcli.methods.targets import CONV1D_MODEL_TYPES, LinearIndex, resolve_targets
from peftcli.model.parts import LANGUAGE, PROJECTOR, VISION, part_modules, part_of
from peftcli.tasks import TASKS

if TYPE_CHECKING:
    import torch.nn as nn

    from peftcli.recipe import PeftSection


def check_fit(
    method: Method,
    section: PeftSection,
    task: str,
    model_type: str | None,
    quantized: bool,
    packing: bool = False,
) -> list[str]:
    """Refuse a method that cannot work with this model, task or recipe — before weights load.

    Returns notes on recipe keys the method ignores: a recipe tuned for LoRA (r, alpha,
    target_modules) stays usable for every method, which `compare` relies on."""
    if packing and method.kind != "targets":
        raise UserError(
            f"data.packing does not work with {method.name}: its virtual tokens would be shared "
            "by every example in a packed row; set data.packing: false"
        )
    if task not in method.tasks:
        raise UserError(
            f"peft.method: {method.name} does not support model.task: {task}",
            f"it supports {', '.join(sorted(method.tasks))}",
        )
    if method.model_types is not None and model_type is not None and model_type not in method.model_types:
        raise UserError(
            f"peft.method: {method.name} does not support {model_type} models",
            f"it supports {', '.join(sorted(method.model_types))}",
        )
    if not method.conv1d and model_type in CONV1D_MODEL_TYPES:
        raise UserError(
            f"peft.method: {method.name} cannot adapt the Conv1D layers of {model_type} models",
            "use lora, dora, ia3, vera or adapter",
        )
    if model_type is not None:
        check_carries(method, model_type, task)
    inits.check_model_type(section, model_type, CONV1D_MODEL_TYPES)
    if quantized and not method.quantized_base:
        raise UserError(
            f"peft.method: {method.name} cannot train on a quantized base; set model.quantization: none"
        )
    keys = ["r", "alpha", "dropout"] + (["target_modules", "layers"] if method.kind != "targets" else [])
    ignored = [
        k
        for k in keys
        if k in section.model_fields_set
        and k not in method.generic
        and (k not in ("target_modules", "layers") or getattr(section, k) is not None)
    ]
    return [f"peft.{k} does not apply to {method.name}: ignored" for k in ignored]


def check_carries(method: Method, model_type: str, task: str) -> None:
    """Refuse a method the installed libraries cannot put on this architecture."""
    if method.kv_prefix and not takes_past_key_values(model_type, task):
        import transformers

        raise UserError(
            f"peft.method: {method.name} cannot train {model_type} models for {task} with transformers "
            f"{transformers.__version__}: their forward takes no past_key_values, which carry the prefixes",
            "use prompt-tuning or p-tuning (virtual tokens at the input) or lora",
        )


@functools.cache
def takes_past_key_values(model_type: str, task: str) -> bool:
    """Whether PEFT's prefix tuning can hand its prefixes to the installed transformers' model.

    PEFT passes them as `past_key_values`. For classification it first checks, literally, that
    the task model's or its backbone's forward names that argument (transformers 5.24 renamed
    it to `cache`, so BERT fails there); language models get it as a keyword, which a forward
    takes by name or through transformers' deprecation alias. So the answer is read from the
    installed classes, never from a table. An architecture transformers does not know (remote
    code) is given the benefit of the doubt."""
    import transformers
    from transformers.models.auto import modeling_auto as auto

    names = [getattr(auto, TASKS[task].auto_mapping).get(model_type)]
    if task == "seq_cls":
        names.append(auto.MODEL_MAPPING_NAMES.get(model_type))
    classes = [getattr(transformers, n, None) for n in names if isinstance(n, str)]
    if not classes or None in classes:
        return True
    return any(_takes(c.forward, "past_key_values", aliases=task != "seq_cls") for c in classes)


def _takes(function: Any, name: str, aliases: bool) -> bool:
    """`function` has a parameter `name`, or (with `aliases`) a decorator of transformers'
    `deprecate_kwarg` that renames `name` to a parameter it has."""
    if name in inspect.signature(function).parameters:
        return True
    while aliases and function is not None:
        cells = getattr(function, "__closure__", None) or ()
        names = getattr(getattr(function, "__code__", None), "co_freevars", ())
        free = {}
        for var, cell in zip(names, cells, strict=False):
            try:
                free[var] = cell.cell_contents
            except ValueError:  # an empty cell
                continue
        if free.get("old_name") == name and free.get("new_name"):
            return True
        function = getattr(function, "__wrapped__", None)
    return False


def config_kwargs(method: Method, section: PeftSection) -> dict[str, Any]:
    """The config keywords the recipe sets: peftcli's defaults, the generic keys, then options."""
    if problems := options_problems(method, section.options):
        raise UserError(problems[0])
    kwargs = dict(method.defaults)
    for key, name in method.generic.items():
        # A generic key the user did not set leaves peftcli's method default in place.
        if key in section.model_fields_set or name not in kwargs:
            kwargs[name] = getattr(section, key)
    kwargs.update(section.options)
    kwargs.update(method.fixed)
    return kwargs


def apply_method(model: nn.Module, section: PeftSection, task: str, total_steps: int | None = None) -> Any:
    """Wrap `model` with the recipe's PEFT method; returns the PeftModel.

    `total_steps` is the run's number of optimizer steps (AdaLoRA schedules its rank budget
    over it)."""
    from peft import get_peft_model

    method = METHODS[section.method]
    check_carries(method, model.config.model_type, task)  # a hub model checked only now
    inits.check_model_type(section, model.config.model_type, CONV1D_MODEL_TYPES)
    index = within_parts(LinearIndex.from_model(model), section, task)
    targets: dict[str, Any] = {"names": []}
    if method.kind == "targets":
        targets = resolve_targets(index, section.target_modules, section.layers, list(method.default_targets))
        check_parameters(method, section, targets)
    kwargs = config_kwargs(method, section)
    on_meta = _on_meta(model)
    kwargs.update(inits.config_kwargs(section, on_meta))
    if method.derive is not None:
        derived = method.derive(Context(section, model, index, targets, total_steps))
        kwargs.update({k: v for k, v in derived.items() if k not in section.options})  # options win
    targets.pop("names")
    targets.pop("parameters", None)
    if section.train_projector:  # trained in full and saved with the adapter (PEFT's modules_to_save)
        kwargs["modules_to_save"] = [*kwargs.get("modules_to_save", []), *part_modules(model, PROJECTOR)]
    try:
        config = config_class(method.config_class)(task_type=TASKS[task].peft_task_type, **targets, **kwargs)
        peft_model = get_peft_model(model, config)
    except (TypeError, ValueError) as exc:
        raise UserError(f"peft.method: {method.name}: {str(exc).strip().splitlines()[0]}") from None
    if not on_meta:
        inits.after_wrap(peft_model, section)
    return peft_model


def within_parts(index: LinearIndex, section: PeftSection, task: str) -> LinearIndex:
    """A vision-language model's linears that the method may adapt: the language model's, and the
    vision tower's with `peft.train_vision` (the projector is trained in full or not at all)."""
    if not TASKS[task].vision:
        if section.train_vision or section.train_projector:
            key = "train_vision" if section.train_vision else "train_projector"
            raise UserError(
                f"peft.{key} applies to vision-language models (model.task: image_text_to_text); remove it"
            )
        return index
    parts = {LANGUAGE, VISION} if section.train_vision else {LANGUAGE}
    names = [n for n in index.names if part_of(n) in parts]
    outside = [n for n in index.names if n not in names]
    shapes = {n: index.shapes[n] for n in names}
    return LinearIndex(names, index.attention & set(names), shapes, index.experts, index.routers, outside)


def _on_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def check_parameters(method: Method, section: PeftSection, targets: dict[str, Any]) -> None:
    """Fused expert and router parameters take LoRA only (PEFT's `target_parameters`), and
    without dropout: its update cannot be factored out of the expert matmuls."""
    if not targets.get("parameters"):
        return
    shown = ", ".join(targets["target_parameters"][:4])
    if not method.parameters:
        able = ", ".join(m for m, row in METHODS.items() if row.parameters)
        raise UserError(
            f"peft.target_modules: {method.name} cannot adapt fused expert or router parameters ({shown})",
            f"use {able}, or leave out experts and router",
        )
    if section.dropout:
        raise UserError(
            f"peft.dropout: {section.dropout} does not work with LoRA on fused expert or router "
            f"parameters ({shown}): PEFT applies no dropout there",
            "set peft.dropout: 0",
        )


# --------------------------------------------------------------------------- training hooks


def step_hook(section: PeftSection) -> Any:
    """Called after every optimizer step, before gradients are cleared (AdaLoRA reads them)."""
    return METHODS[section.method].step_hook


def penalty(section: PeftSection) -> Any:
    """An extra loss term, added once per optimizer step."""
    return METHODS[section.method].penalty


def lr_ratios(section: PeftSection) -> dict[str, float]:
    """Learning-rate multipliers by parameter-name part (LoRA+: the B matrices learn faster)."""
    return {"lora_B": section.lora_plus_ratio} if section.lora_plus_ratio is not None else {}
