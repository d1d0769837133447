"""Merging an adapter into its base in memory: what `peftcli merge` writes as a model folder and
`peftcli export` writes as a GGUF file (one implementation, used by both commands).

The merge itself is PEFT's (`merge_and_unload`, `add_weighted_adapter`). What peftcli adds: the
merge happens in float32 on the CPU, and a quantized base (QLoRA, 4/8-bit) is first dequantized
(the adapter was trained against the dequantized weights, not the original checkpoint).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftcli.errors import UserError

if TYPE_CHECKING:
    from peftcli.target import Target


@dataclass
class Source:
    path: Path  # as the user named it
    target: Target
    method: str

    @property
    def adapter(self) -> Path:
        assert self.target.adapter is not None
        return self.target.adapter


def adapter_method(target: Target) -> str:
    """The peftcli method of an adapter: the run's recipe says it; else its adapter_config."""
    from peftcli.methods import method_of
    from peftcli.run_folder.layout import adapter_file

    if target.recipe is not None:
        return target.recipe.peft.method
    assert target.adapter is not None
    config = json.loads(adapter_file(target.adapter).read_text())
    peft_type = str(config.get("peft_type"))
    method = method_of(peft_type, config)
    if method is None:
        raise UserError(
            f"{target.adapter}/adapter_config.json: peft_type {peft_type} is not a peftcli method"
        )
    return method.name


def open_sources(paths: list[Path], trust_remote_code: bool = False, hint: str | None = None) -> list[Source]:
    """Open each run or adapter folder; refuse a model folder without an adapter and a method
    that does not merge (`hint`: what to use instead; default: serve it as an adapter)."""
    from peftcli.methods import METHODS
    from peftcli.target import open_target

    sources = []
    for path in paths:
        target = open_target(path, trust_remote_code)
        if target.adapter is None:
            raise UserError(f"{path} is a model folder with no adapter: there is nothing to merge into it")
        method = adapter_method(target)
        if not METHODS[method].merges:
            raise UserError(
                f"{path}: {method} adapters cannot be merged into the base weights (they add "
                f"{'virtual tokens' if METHODS[method].kind != 'targets' else 'modules'} of their own)",
                hint
                or f"serve it as an adapter: PeftModel.from_pretrained(base, '{target.adapter}'), "
                f"or `peftcli generate {path}`",
            )
        sources.append(Source(path, target, method))
    return sources


# --------------------------------------------------------------------------- loading


def dequantize_into(float_model: Any, quantized: Any) -> list[str]:
    """Copy the dequantized weight of every bitsandbytes layer of `quantized` into the same
    module of `float_model` (a float32 load of the same checkpoint). Returns the module names.

    The adapter learnt a correction to these dequantized weights; merging it into the
    original checkpoint weights would add back the quantization error it compensated for."""
    import bitsandbytes as bnb
    import torch
    from peft.utils.integrations import dequantize_bnb_weight

    names = []
    for name, module in quantized.named_modules():
        if isinstance(module, bnb.nn.Linear4bit | bnb.nn.Linear8bitLt):
            weight = dequantize_bnb_weight(module.weight, state=getattr(module, "state", None))
            target = float_model.get_submodule(name).weight
            with torch.no_grad():
                target.copy_(weight.to(device=target.device, dtype=torch.float32))
            names.append(name)
    return names


def load_adapter_model(base: Any, sources: list[Source], names: list[str]) -> Any:
    from peftcli.methods.load import load_adapter

    model = base
    for source, name in zip(sources, names, strict=True):
        model = load_adapter(model, source.adapter, adapter_name=name)
    model.eval()
    return model


def load_bases(section: Any, labels: Any) -> tuple[Any, Any]:
    """The base in float32 on the CPU, where the merge happens whatever the base's dtype or
    quantization; for a quantized base also the quantized model, whose layers are dequantized
    into the float32 copy (None otherwise)."""
    import torch

    from peftcli.console import say
    from peftcli.model.load import load_model

    base = load_model(section.model_copy(update={"quantization": "none", "dtype": "float32"}), labels=labels)
    if section.quantization == "none":
        return base, None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    quantized_model = load_model(section, device=device, labels=labels)
    count = len(dequantize_into(base, quantized_model))
    say(f"peftcli: dequantized {count} {section.quantization} layers into a float32 copy of the base")
    return base, quantized_model


def merged_model(
    base: Any,
    sources: list[Source],
    weights: list[float] | None,
    combination: str,
    density: float | None,
    change: dict[str, Any] | None = None,
) -> Any:
    """The adapters loaded on `base`, combined into one when weighted, folded into its weights.
    With `change` ({"rows": eval rows, "task": ...}), it is filled with how far the merge moved
    the model (peftcli.merge_change)."""
    import torch

    names = ["default"] if weights is None else [f"adapter{i}" for i in range(len(sources))]
    model = load_adapter_model(base, sources, names)
    if weights is not None:
        torch.manual_seed(0)  # dare_* drop entries at random: the same merge every time
        try:
            model.add_weighted_adapter(
                names, weights, "combined", combination_type=combination, density=density
            )
        except ValueError as exc:
            raise UserError(
                f"cannot combine {', '.join(str(s.path) for s in sources)} with --combination "
                f"{combination}: {str(exc).splitlines()[0]}",
                "cat and svd accept adapters of different ranks",
            ) from None
        model.set_adapter("combined")
        names = ["combined"]
    if change is not None:
        from peftcli.merge_change import measured_merge

        merged, found = measured_merge(model, names, change.pop("rows"), change.pop("task"))
        change.update(found)
        return merged
    with torch.no_grad():
        return model.merge_and_unload(safe_merge=True, adapter_names=names)


def load_tokenizer_of(source: Source) -> Any:
    """The tokenizer the run trained with (saved with its adapter, chat template included);
    the base model's when the adapter folder has none."""
    from peftcli.target import target_tokenizer

    return target_tokenizer(source.target)


def merged_in_memory(source: Source) -> Any:
    """One adapter folded into its float32 base (dequantized first when the run's base was
    4/8-bit), on the CPU, in eval mode: the model `merge` would save."""
    from peftcli.console import quiet_libraries
    from peftcli.target import labels_of

    quiet_libraries()
    base, _ = load_bases(source.target.model, labels_of(source.target))
    return merged_model(base, [source], None, "cat", None).eval()


def vllm_note_of(source: Source) -> str | None:
    """The line `merge` and `export` say when vLLM would not serve this adapter as trained."""
    from peftcli.methods.serving import vllm_note
    from peftcli.run_folder.layout import adapter_file

    config = json.loads(adapter_file(source.adapter).read_text(encoding="utf-8"))
    return vllm_note(config, source.target.model.quantization != "none")
