"""LoRA initialisations (`peft.init`) and variants (`peft.rslora`, `peft.lora_plus_ratio`,
`peft.rank_pattern`, `peft.alpha_pattern`): one row per initialisation, what each refuses, and
how a run's adapter is saved so that any reader gets the trained model.

PiSSA and OLoRA move the adapter's initial product out of the base weights (W_res = W − s·B₀A₀).
Their raw A, B only work on that mutated base, so peftcli always saves the converted form
(PEFT's `path_initial_model_for_weight_conversion`): [A | A₀], [B | −B₀], rank 2r, which applied
to the ORIGINAL base gives W_res + s·BA exactly. Imports nothing heavy at module level.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftcli.methods.init_table import LORA_FAMILY, init_row
from peftcli.run_folder.layout import adapter_file

if TYPE_CHECKING:
    from peftcli.recipe import PeftSection

INITIAL = "peftcli_initial_adapter"  # attribute of a PeftModel: its adapter tensors before training


def check_model_type(section: PeftSection, model_type: str | None, conv1d_types: Iterable[str]) -> None:
    from peftcli.errors import UserError

    if section.init != "default" and not init_row(section.init).conv1d and model_type in set(conv1d_types):
        raise UserError(
            f"peft.init: {section.init} cannot initialise the Conv1D layers of {model_type} models "
            "(PEFT's OLoRA builds the wrong shapes)",
            "use pissa or gaussian",
        )


def check_sharding(section: PeftSection, distributed_type: str) -> None:
    """PiSSA/OLoRA's conversion reads the whole initial and trained adapter beside the model:
    not under FSDP, where both are sharded."""
    from peftcli.errors import UserError

    if distributed_type == "FSDP" and section.init != "default" and init_row(section.init).mutates_base:
        raise UserError(
            f"peft.init: {section.init} does not train under FSDP (its saved adapter is converted from "
            "whole tensors)",
            "use DDP or one process, or peft.init: eva or gaussian",
        )


def config_kwargs(section: PeftSection, on_meta: bool) -> dict[str, Any]:
    """LoraConfig keywords of the recipe's init and variants. On the meta device (estimate) no
    initialisation runs: the shapes are the same."""
    if section.method not in LORA_FAMILY:
        return {}
    kwargs: dict[str, Any] = {}
    row = init_row(section.init)
    if row.peft_value is not None and not on_meta:
        kwargs["init_lora_weights"] = section.init if row.name == "pissa" else row.peft_value
    if section.rslora:
        kwargs["use_rslora"] = True
    if section.rank_pattern:
        kwargs["rank_pattern"] = dict(section.rank_pattern)
    if section.alpha_pattern:
        kwargs["alpha_pattern"] = dict(section.alpha_pattern)
    return kwargs


def after_wrap(peft_model: Any, section: PeftSection) -> None:
    """What an init does once the model is wrapped: LoftQ fits A, B to the 4-bit base; PiSSA and
    OLoRA keep their initial A₀, B₀ (the saved adapter is converted with them)."""
    if section.method not in LORA_FAMILY or section.init == "default":
        return
    row = init_row(section.init)
    if row.needs_4bit:
        loftq(peft_model)
    if row.mutates_base:
        from peft.utils import get_peft_model_state_dict

        initial = {
            k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(peft_model).items()
        }
        setattr(peft_model, INITIAL, initial)


def loftq(peft_model: Any) -> None:
    """LoftQ on a base loaded in 4 bits (PEFT's replace_lora_weights_loftq, one iteration): each
    target's original weight W is read again from the checkpoint's safetensors, and A, B take the
    top-r SVD of W − NF4(W), so NF4(W) + s·BA ≈ W. The base stays what loading the original model
    in NF4 gives: the adapter applies to it. PEFT's function computes on CUDA only and leaves out
    the scaling s; this is the same computation on the layer's device, divided by s."""
    import bitsandbytes as bnb
    import torch
    from peft.tuners.lora.bnb import Linear4bit
    from peft.utils.loftq_utils import _low_rank_decomposition, _SafetensorLoader

    name = peft_model.get_base_model().config._name_or_path
    weights = _SafetensorLoader(peft_model, name if Path(name).is_dir() else None)
    adapter, prefix = peft_model.active_adapter, "base_model.model."
    for module_name, module in peft_model.named_modules():
        if not isinstance(module, Linear4bit):
            continue
        base = module.get_base_layer().weight
        original = weights.get_tensor(module_name.removeprefix(prefix) + ".weight").to(
            base.device, torch.float32
        )
        residual = original - bnb.functional.dequantize_4bit(base.data, base.quant_state).float()
        parts = _low_rank_decomposition(residual, reduced_rank=module.r[adapter])
        a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
        a.data = parts["R"].to(a.dtype).contiguous()
        b.data = (parts["L"] / module.scaling[adapter]).to(b.dtype).contiguous()


EVA_BATCHES = 100  # at most this many distinct batches; EVA cycles them until its components settle


def eva(peft_model: Any, loader: Iterable[dict[str, Any]], device: Any = None, limit: int = 100) -> int:
    """EVA's data-driven init on the run's own training batches (PEFT's
    initialize_lora_eva_weights: incremental SVD of each target layer's inputs until its top
    components stop moving, ranks then redistributed by explained variance). Returns the number
    of batches it ran; more than `limit` is refused (the components never settle)."""
    import itertools

    from peft import initialize_lora_eva_weights

    from peftcli.errors import UserError

    count = 0

    def forward(model: Any, inputs: dict[str, Any]) -> Any:
        nonlocal count
        count += 1
        if count > limit:
            raise UserError(
                f"peft.init: eva: the layers' input components did not settle within {limit} batches",
                "use more training data, a smaller peft.r, or another peft.init",
            )
        keys = ("input_ids", "attention_mask", "position_ids")
        return model(**{k: v for k, v in inputs.items() if k in keys})

    batches = [{k: v.to(device) for k, v in b.items()} for b in itertools.islice(loader, EVA_BATCHES)]
    # Every process reads the same batches and computes the same init: nothing to gather.
    initialize_lora_eva_weights(
        peft_model,
        dataloader=batches,
        forward_fn=forward,
        show_progress_bar=False,
        gather_distributed_inputs=False,
    )
    # Layers EVA gives rank 0 lose their LoRA layer, but PEFT's shortened target_modules still name
    # them, so a reader would add them back (empty, with a "missing keys" warning): list the ones kept.
    from peft.tuners.lora import LoraLayer

    kept = [
        n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)
    ]
    peft_model.peft_config[peft_model.active_adapter].target_modules = sorted(kept)
    return count


def save_pretrained(peft_model: Any, folder: Path, state_dict: dict[str, Any] | None = None) -> None:
    """`peft_model.save_pretrained`, converted where the init mutated the base (PiSSA, OLoRA): the
    saved A, B apply to the original base, rank 2r. The conversion loads the initial adapter
    beside the trained one for a moment, which puts the model in eval mode: under a forked RNG
    and with the mode put back, so a checkpoint leaves dropout as an uninterrupted run has it."""
    initial = getattr(peft_model, INITIAL, None)
    if initial is None:
        peft_model.save_pretrained(folder, state_dict=state_dict)
        return
    import tempfile

    import torch
    from safetensors.torch import save_file

    training = peft_model.training
    with tempfile.TemporaryDirectory() as tmp, torch.random.fork_rng():
        start = Path(tmp) / "initial"
        start.mkdir()
        save_file(initial, adapter_file(start, weights=True))
        peft_model.save_pretrained(
            folder, state_dict=state_dict, path_initial_model_for_weight_conversion=str(start)
        )
    peft_model.train(training)
