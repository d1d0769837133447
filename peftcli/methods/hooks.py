"""What single methods need beyond their PEFT config: the functions `table.METHODS` names in
their rows.

Imports nothing heavy at module level (the table, and so `validate`, imports this file); torch
is imported inside the functions that run during training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    import torch.nn as nn


@dataclass(frozen=True)
class Context:
    """What a method's `derive` reads: config values that depend on the loaded model or on the
    run's length, not on the recipe alone."""

    section: Any  # the recipe's PeftSection (the recipe imports the method table, not back)
    model: nn.Module
    index: Any  # methods.targets.LinearIndex: the model's linear layers
    targets: dict[str, Any]  # resolve_targets' answer ({"names": []} for virtual-token methods)
    total_steps: int | None  # the run's number of optimizer steps


# --------------------------------------------------------------------------- derive


def adalora_schedule(c: Context) -> dict[str, Any]:
    steps = c.total_steps or 1
    # The budget schedule: warm up at full rank, prune, then fine-tune at the final ranks.
    return {
        "total_step": steps,
        "tinit": int(0.1 * steps),
        "tfinal": int(0.3 * steps),
        "target_r": max(1, c.section.r // 2),
    }


def ia3_feedforward(c: Context) -> dict[str, Any]:
    if "feedforward_modules" in c.section.options:
        return {}
    # PEFT wants feedforward_modules as a subset of target_modules, written the same way.
    ff = sorted(n for n in c.targets["names"] if n in c.index.mlp_outputs())
    short = c.targets["target_modules"] != c.targets["names"]
    return {"feedforward_modules": sorted({n.rsplit(".", 1)[-1] for n in ff}) if short else ff}


def prompt_tokenizer(c: Context) -> dict[str, Any]:
    """A prompt initialised from text is tokenized with the model's own tokenizer."""
    options = c.section.options
    if options.get("prompt_tuning_init") != "TEXT":
        return {}
    return {"tokenizer_name_or_path": options.get("tokenizer_name_or_path") or c.model.config._name_or_path}


def llama_adapter_layers(c: Context) -> dict[str, Any]:
    return {"adapter_layers": min(30, c.model.config.num_hidden_layers)}


# --------------------------------------------------------------------------- training


def adalora_allocate(peft_model: Any, step: int) -> None:
    """Reallocate the rank budget; runs before gradients are cleared (it reads them)."""
    peft_model.base_model.update_and_allocate(step)


def adalora_orthogonality(peft_model: Any) -> torch.Tensor:
    """AdaLoRA's orthogonality regulariser: mean ‖PPᵀ − I‖_F over the A and B matrices.

    It lives in PEFT's forward and only runs when the model computes its own loss; peftcli
    computes the loss itself (to normalise it over the global batch), so the training loop adds
    the same term once per optimizer step."""
    import torch

    weight = peft_model.peft_config[peft_model.active_adapter].orth_reg_weight
    terms = []
    for name, p in peft_model.named_parameters():
        if p.requires_grad and ("lora_A" in name or "lora_B" in name):
            cov = p @ p.T if "lora_A" in name else p.T @ p
            terms.append(
                torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], device=cov.device, dtype=cov.dtype))
            )
    return weight * torch.stack(terms).mean() if terms else torch.zeros(())


# --------------------------------------------------------------------------- checkpoints

_ALLOCATOR_STATE = ("ipt", "exp_avg_ipt", "exp_avg_unc")  # the importance scores seen so far


def _allocator(peft_model: Any) -> Any:
    return getattr(getattr(peft_model, "base_model", None), "rankallocator", None)


def adalora_allocator_state(peft_model: Any) -> dict[str, Any] | None:
    """The importance scores seen so far, and the rank pattern once ranks are pruned (masks
    after the final allocation are applied from it)."""
    alloc = _allocator(peft_model)
    if alloc is None:
        return None
    config = peft_model.peft_config[peft_model.active_adapter]
    return {**{k: getattr(alloc, k) for k in _ALLOCATOR_STATE}, "rank_pattern": config.rank_pattern}


def restore_adalora_allocator(peft_model: Any, saved: dict[str, Any]) -> None:
    saved = dict(saved)
    if "rank_pattern" in saved:
        peft_model.peft_config[peft_model.active_adapter].rank_pattern = saved.pop("rank_pattern")
    if (alloc := _allocator(peft_model)) is not None:
        for key, value in saved.items():
            setattr(alloc, key, value)
