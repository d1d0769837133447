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
