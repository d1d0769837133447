"""PEFT methods: one table from `peft.method` to its PEFT config, and `apply_method`.

The table imports nothing heavy, so the recipe schema, `validate` and `methods` stay fast;
`apply_method` imports PEFT when it runs.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from peftcli.errors import UserError, did_you_mean
from peftcli.methods.targets import LinearIndex, resolve_targets
from peftcli.tasks import TASKS

if TYPE_CHECKING:
    import torch
    import torch.nn as nn

    from peftcli.recipe import PeftSection

Kind = Literal["targets", "prompt", "adaption"]


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    config_class: str  # a class of `peft` (or of peftcli.methods.tuners for peftcli's own methods)
    merges: bool  # can the adapter be folded into the base weights?
    kind: Kind = "targets"  # targets: adapts modules; prompt: virtual tokens; adaption: gated prompts
    # The recipe's generic keys (r, alpha, dropout) and the config field each one sets.
    generic: dict[str, str] = field(default_factory=dict)
    fixed: dict[str, Any] = field(default_factory=dict)  # config values the method implies
    defaults: dict[str, Any] = field(default_factory=dict)  # config defaults peftcli chooses
    default_targets: tuple[str, ...] = ("all-linear",)
    tasks: frozenset[str] = frozenset(TASKS)
    model_types: frozenset[str] | None = None  # None = any architecture
    quantized_base: bool = True  # works on a 4/8-bit base
    conv1d: bool = True  # can adapt GPT-2-style Conv1D layers
    kv_prefix: bool = False  # feeds trained key/values through the model's `past_key_values`


_LORA_KEYS = {"r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout"}
_PROMPT_DEFAULTS = {"num_virtual_tokens": 16}

METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("lora", "low-rank update B·A added to target linears", "LoraConfig", True, generic=_LORA_KEYS),
        Method(
            "qlora",
            "LoRA on a 4-bit NF4 base (implies model.quantization: 4bit)",
            "LoraConfig",
            True,
            generic=_LORA_KEYS,
        ),
        Method(
            "dora",
            "weight-decomposed LoRA: magnitude vector + low-rank direction",
            "LoraConfig",
            True,
            generic=_LORA_KEYS,
            fixed={"use_dora": True},
        ),
        Method(
            "adalora",
            "LoRA whose rank budget is reallocated by SVD importance during training",
            "AdaLoraConfig",
            True,
            generic={"r": "init_r", "alpha": "lora_alpha", "dropout": "lora_dropout"},
        ),
        Method(
            "ia3",
            "learned scaling vectors on keys, values and the FFN down projection",
            "IA3Config",
            True,
            default_targets=("keys-values", "mlp-output"),
        ),
        Method(
            "loha",
            "low-rank Hadamard product update (LyCORIS)",
            "LoHaConfig",
            True,
            generic={"r": "r", "alpha": "alpha", "dropout": "rank_dropout"},
            conv1d=False,
            quantized_base=False,  # PEFT's LyCORIS layers read the packed 4-bit weight as a matrix
        ),
        Method(
            "lokr",
            "low-rank Kronecker product update (LyCORIS)",
            "LoKrConfig",
            True,
            generic={"r": "r", "alpha": "alpha", "dropout": "rank_dropout"},
            conv1d=False,
            quantized_base=False,  # PEFT's LyCORIS layers read the packed 4-bit weight as a matrix
        ),
        Method(
            "vera",
            "shared frozen random low-rank matrices with trained scaling vectors",
            "VeraConfig",
            True,
            generic={"r": "r", "dropout": "vera_dropout"},
            defaults={"r": 64},
        ),
        Method(
            "oft",
            "orthogonal fine-tuning: block-diagonal orthogonal rotation of the weights",
            "OFTConfig",
            True,
            # PEFT's own default: blocks of 32 (so the rotation's cost does not grow with width).
            generic={"dropout": "module_dropout"},
            defaults={"oft_block_size": 32, "r": 0},
            conv1d=False,
        ),
        Method(
            "adapter",
            "Houlsby bottleneck adapters: down-projection, nonlinearity, up-projection, residual",
            "BottleneckConfig",
            False,
            generic={"r": "bottleneck_size", "dropout": "dropout"},
            default_targets=("attention-output", "mlp-output"),
        ),
        Method(
            "prompt-tuning",
            "trained soft-prompt embeddings prepended to the input",
            "PromptTuningConfig",
            False,
            kind="prompt",
            defaults=_PROMPT_DEFAULTS,
        ),
        Method(
            "p-tuning",
            "soft prompt produced by a small trained encoder (MLP or LSTM)",
            "PromptEncoderConfig",
            False,
            kind="prompt",
            defaults={**_PROMPT_DEFAULTS, "encoder_hidden_size": 128},
        ),
        Method(
            "prefix-tuning",
            "trained key/value prefixes at every layer",
            "PrefixTuningConfig",
            False,
            kind="prompt",
            defaults=_PROMPT_DEFAULTS,
            kv_prefix=True,
        ),
        Method(
            "llama-adapter",
            "adaption prompts with zero-init gating in the top layers (LLaMA-Adapter)",
            "AdaptionPromptConfig",
            False,
            kind="adaption",
            defaults={"adapter_len": 10},
            tasks=frozenset({"causal_lm"}),
            model_types=frozenset({"llama", "mistral", "gpt2"}),
            quantized_base=False,
        ),
    ]
}


def canonical_method(name: str) -> str:
    return name.strip().lower().replace("_", "-")


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
    from peftcli.methods.targets import CONV1D_MODEL_TYPES

    if not method.conv1d and model_type in CONV1D_MODEL_TYPES:
        raise UserError(
            f"peft.method: {method.name} cannot adapt the Conv1D layers of {model_type} models",
            "use lora, dora, ia3, vera or adapter",
        )
    if model_type is not None:
        check_carries(method, model_type, task)
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
    import inspect

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


# --------------------------------------------------------------------------- configs


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


def config_kwargs(method: Method, section: PeftSection) -> dict[str, Any]:
    """The config keywords the recipe sets: peftcli's defaults, the generic keys, then options."""
    valid = config_fields(method.config_class) - {"peft_type", "task_type", "target_modules"}
    kwargs = dict(method.defaults)
    for key, name in method.generic.items():
        # A generic key the user did not set leaves peftcli's method default in place.
        if key in section.model_fields_set or name not in kwargs:
            kwargs[name] = getattr(section, key)
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


def _derived_kwargs(
    method: Method,
    section: PeftSection,
    model: nn.Module,
    index: LinearIndex,
    targets: dict[str, Any],
    total_steps: int | None,
) -> dict[str, Any]:
    """Config values that depend on the loaded model or on the run's length."""
    options = section.options
    out: dict[str, Any] = {}
    if method.name == "adalora":
        steps = total_steps or 1
        out["total_step"] = steps
        # The budget schedule: warm up at full rank, prune, then fine-tune at the final ranks.
        out["tinit"] = int(0.1 * steps)
        out["tfinal"] = int(0.3 * steps)
        out["target_r"] = max(1, section.r // 2)
    if method.name == "ia3" and "feedforward_modules" not in options:
        # PEFT wants feedforward_modules as a subset of target_modules, written the same way.
        ff = sorted(n for n in targets["names"] if n in index.mlp_outputs())
        short = targets["target_modules"] != targets["names"]
        out["feedforward_modules"] = sorted({n.rsplit(".", 1)[-1] for n in ff}) if short else ff
    if method.name == "prompt-tuning" and options.get("prompt_tuning_init") == "TEXT":
        out["tokenizer_name_or_path"] = options.get("tokenizer_name_or_path") or model.config._name_or_path
    if method.name == "llama-adapter":
        out["adapter_layers"] = min(30, model.config.num_hidden_layers)
    return {k: v for k, v in out.items() if k not in options}


def apply_method(model: nn.Module, section: PeftSection, task: str, total_steps: int | None = None) -> Any:
    """Wrap `model` with the recipe's PEFT method; returns the PeftModel.

    `total_steps` is the run's number of optimizer steps (AdaLoRA schedules its rank budget
    over it)."""
    from peft import get_peft_model

    method = METHODS[section.method]
    check_carries(method, model.config.model_type, task)  # a hub model checked only now
    index = LinearIndex.from_model(model)
    targets: dict[str, Any] = {"names": []}
    if method.kind == "targets":
        targets = resolve_targets(index, section.target_modules, section.layers, list(method.default_targets))
    kwargs = {
        **config_kwargs(method, section),
        **_derived_kwargs(method, section, model, index, targets, total_steps),
    }
    targets.pop("names")
    try:
        config = config_class(method.config_class)(task_type=TASKS[task].peft_task_type, **targets, **kwargs)
        return get_peft_model(model, config)
    except (TypeError, ValueError) as exc:
        raise UserError(f"peft.method: {method.name}: {str(exc).strip().splitlines()[0]}") from None


def load_adapter(model: Any, folder: Path | str, adapter_name: str = "default") -> Any:
    """Put a saved adapter (any method, peftcli's own included) on `model`: the one way peftcli
    loads adapters. peftcli's tuners are registered with PEFT first, so a fresh process loads
    them like PEFT's own. A PeftModel gets the adapter added under `adapter_name`."""
    from peft import PeftModel

    from peftcli.methods import tuners  # noqa: F401  registers peftcli's own tuners with PEFT

    try:
        if isinstance(model, PeftModel):
            model.load_adapter(str(folder), adapter_name=adapter_name)
            return model
        return PeftModel.from_pretrained(model, str(folder), adapter_name=adapter_name)
    except Exception as exc:  # safetensors, PEFT and torch raise many types for a broken adapter
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load the adapter in {folder}: {first}") from None


# --------------------------------------------------------------------------- training hooks


def step_hook(section: PeftSection) -> Any:
    """Called after every optimizer step, before gradients are cleared (AdaLoRA reads them)."""
    if section.method != "adalora":
        return None
    return lambda peft_model, step: peft_model.base_model.update_and_allocate(step)


def penalty(section: PeftSection) -> Any:
    """An extra loss term, added once per optimizer step.

    AdaLoRA's orthogonality regulariser lives in PEFT's forward and only runs when the model
    computes its own loss; peftcli computes the loss itself (to normalise it over the global
    batch), so the same term is added here: mean ‖PPᵀ − I‖_F over the A and B matrices."""
    if section.method != "adalora":
        return None

    def orthogonality(peft_model: Any) -> torch.Tensor:
        import torch

        weight = peft_model.peft_config[peft_model.active_adapter].orth_reg_weight
        terms = []
        for name, p in peft_model.named_parameters():
            if p.requires_grad and ("lora_A" in name or "lora_B" in name):
                cov = p @ p.T if "lora_A" in name else p.T @ p
                terms.append(
                    torch.linalg.matrix_norm(
                        cov - torch.eye(cov.shape[0], device=cov.device, dtype=cov.dtype)
                    )
                )
        return weight * torch.stack(terms).mean() if terms else torch.zeros(())

    return orthogonality
