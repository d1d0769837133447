"""Models sharded by FSDP2: what a process holds of them, the adapter gathered whole for saving,
and the optimizer state saved and restored shard by shard.

Under FSDP2 every parameter of a wrapped module is a DTensor: each process holds its own slice
(`to_local()`), and reading the whole tensor (`full_tensor()`) is a collective that every process
must enter. So the helpers that gather are called by every process, the main process writes.
The frozen base is never gathered; only the adapter (small) is, for PEFT's save_pretrained and
for the checkpoint's exact trainable tensors. The optimizer state stays sharded on disk: one
file per process, its local slices.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import torch


def is_dtensor(t: Any) -> bool:
    return hasattr(t, "full_tensor") and hasattr(t, "to_local")


def is_sharded(model: Any) -> bool:
    return any(is_dtensor(p) for p in model.parameters())


def parameter_bytes(model: Any, accelerator: Any) -> dict[str, int]:
    """What the processes hold of the model's parameters, measured from the tensors: the bytes of
    the largest process's local tensors (a DTensor's own slice) and of the whole model. Every
    process calls this."""
    local = whole = 0
    for p in model.parameters():
        mine = p.to_local() if is_dtensor(p) else p
        whole += p.numel() * p.element_size()
        local += mine.numel() * mine.element_size()
    if accelerator.num_processes > 1:
        local = int(accelerator.reduce(torch.tensor(local, device=accelerator.device), "max"))
    return {"param_bytes_per_process": local, "param_bytes": whole}


def _whole(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if is_dtensor(t) else t).detach().cpu().contiguous()


def adapter_state(peft_model: Any) -> dict[str, torch.Tensor] | None:
    """The adapter's tensors, gathered whole, under the model's state_dict keys, for
    `save_pretrained(state_dict=...)`; None when the model is not sharded (PEFT reads it itself).

    PEFT keeps from a state dict only the adapter's entries, and every one of them names the
    adapter (`lora_A.default.weight`, `modules_to_save.default.weight`); the frozen base is left
    out, so it is never gathered. Every process calls this."""
    if not is_sharded(peft_model):
        return None
    name = peft_model.active_adapter
    return {
        key: _whole(value)
        for key, value in peft_model.state_dict().items()
        if f".{name}." in key or key.endswith(f".{name}")
    }


def trainable_state(peft_model: Any) -> dict[str, torch.Tensor]:
    """Every trainable tensor whole, as training holds it (gathered under FSDP; every process
    calls this)."""
    return {n: _whole(p) for n, p in peft_model.named_parameters() if p.requires_grad}


def copy_into(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a whole tensor into a parameter, or into this process's slice of a sharded one."""
    if is_dtensor(param):
        from torch.distributed.tensor import distribute_tensor

        value = distribute_tensor(value.to(param.dtype), param.device_mesh, param.placements)
    param.copy_(value)


def local_optimizer_state(optimizer: Any) -> dict[str, Any]:
    """The optimizer's state dict with this process's slices in place of sharded tensors."""
    state = optimizer.state_dict()
    state["state"] = {
        index: {k: v.to_local() if is_dtensor(v) else v for k, v in entry.items()}
        for index, entry in state["state"].items()
    }
    return state


def load_local_optimizer_state(optimizer: Any, state: dict[str, Any]) -> None:
    """Restore what `local_optimizer_state` saved: each slice becomes a DTensor again, laid out as
    its parameter is (the same processes, so the same slices)."""
    from torch.distributed.tensor import DTensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, entry in state["state"].items():
        p = params[int(index)]
        if not is_dtensor(p):
            continue
        for key, value in entry.items():
            if torch.is_tensor(value) and value.shape == p.to_local().shape and value.ndim > 0:
                entry[key] = DTensor.from_local(
                    value, p.device_mesh, p.placements, shape=p.shape, stride=p.stride(), run_check=False
                )
    optimizer.load_state_dict(state)


def fsdp_memory(
    units: dict[str, int], replicated: int, memory: dict[str, int], processes: int
) -> dict[str, int]:
    """Per-process memory of the one-process plan `memory` under FSDP2 full shard over `processes`.

    `units`: the bytes FSDP shards, per FSDP unit (a decoder layer; the rest of the model is the
    root unit) — the frozen base as stored (a 4-bit weight's packed storage) and the adapter.
    `replicated`: what every process keeps whole (buffers, bitsandbytes' quantization state).
    FSDP2 shards every parameter of a unit, trainable ones included, so the adapter, its
    gradients and AdamW's moments (which follow their parameters) are split N ways too. While a
    unit computes it is held whole, and the next one is gathered ahead of it: the two largest
    units' parameters on top. Activations are per process as without sharding."""
    n = processes
    adapter = memory["adapter_bytes"]
    frozen = sum(units.values()) - adapter
    plan = {
        "weights_bytes": math.ceil(frozen / n) + replicated,
        "adapter_bytes": math.ceil(adapter / n),
        "optimizer_bytes": math.ceil(memory["optimizer_bytes"] / n),
        "gradients_bytes": math.ceil(adapter / n),
        "gathered_bytes": sum(sorted(units.values())[-2:]),
        "activations_bytes": memory["activations_bytes"],
    }
    plan["total_bytes"] = sum(plan.values())
    return plan


_LAYER = re.compile(r"^(.*?\.\d+)\.")  # 'model.layers.3.self_attn...' -> 'model.layers.3'


def fsdp_units(model: Any, stored: Callable[[Any], tuple[int, int]]) -> tuple[dict[str, int], int]:
    """What FSDP2 shards, per unit, and what every process keeps whole (buffers, and the part of
    each frozen parameter `stored(p)` names as kept beside it: a quantized weight's scales and
    tables). A layer is a unit; outside the layers Accelerate wraps the embedding and the head
    apart."""
    units: dict[str, int] = {}
    replicated = sum(b.numel() * b.element_size() for b in model.buffers())
    for name, p in model.named_parameters():
        module = name.removeprefix("base_model.model.").rsplit(".", 1)[0]
        unit = m[1] if (m := _LAYER.match(module + ".")) else module
        data, beside = (p.numel() * p.element_size(), 0) if p.requires_grad else stored(p)
        units[unit] = units.get(unit, 0) + data
        replicated += beside
    return units, replicated


def format_fsdp(plan: dict[str, Any], n: int, quantization: str, ddp_fits: bool | None) -> list[str]:
    """The estimate's lines for the sharded plan, and whether sharding is what makes it fit."""
    from peftcli.console import human_bytes

    lines = [f"memory per process sharded with FSDP over {n} processes (configs/fsdp.yaml):"]
    for key in ("weights", "adapter", "optimizer", "gradients", "gathered", "activations", "total"):
        lines.append(f"  {key:<12} {human_bytes(plan[f'{key}_bytes']):>11}")
    if ddp_fits is False and plan.get("fits"):
        config = "configs/fsdp-qlora.yaml" if quantization == "4bit" else "configs/fsdp.yaml"
        lines.append(f"sharding is what makes it fit: launch with --launch-config {config}")
    elif plan.get("fits") is False:
        lines.append(f"does not fit sharded over {n} processes either")
    return lines
