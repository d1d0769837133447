"""Resumable checkpoints: `checkpoints/step-N/` in the run folder.

A checkpoint holds the adapter (trainable weights only), the optimizer and scheduler states,
every process's RNG states, the loop's progress (step, data position, metric windows) and the
fingerprint of what the run depends on. It is written into a hidden temporary folder and
renamed into place, and `state.json` is written last, so a kill during a save leaves only
complete checkpoints behind.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from peftcli.methods.inits import save_pretrained
from peftcli.run_folder.layout import (
    Layout,
    adapter_file,
    checkpoint_adapter,
    complete,
    latest,
    read_state,
    state_file,
)
from peftcli.training import sharded

# The trainable tensors, exactly as training holds them: PEFT's save_pretrained may reshape what
# it saves (AdaLoRA trims pruned ranks), which a fresh model could not load back mid-run.
TRAINABLE = "trainable.safetensors"


def _save_rng(path: Path) -> None:
    """This process's RNG states, as safetensors + JSON (nothing that needs pickle to load)."""
    import numpy as np
    from safetensors.torch import save_file

    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64))}
    if torch.cuda.is_available():
        tensors.update({f"cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(tensors, path.with_suffix(".safetensors"))
    scalars = {"python": [version, list(mt), gauss], "numpy": [kind, pos, has_gauss, cached]}
    path.with_suffix(".json").write_text(json.dumps(scalars), encoding="utf-8")


def _load_rng(path: Path) -> None:
    import numpy as np
    from safetensors.torch import load_file

    tensors = load_file(path.with_suffix(".safetensors"))
    scalars = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    version, mt, gauss = scalars["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, pos, has_gauss, cached = scalars["numpy"]
    np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(t for t in tensors if t.startswith("cuda_"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def _method_state(peft_model: Any) -> Any:
    """The state the model's method keeps outside its weights (AdaLoRA's importance scores)."""
    from peftcli.methods.table import method_of

    config = peft_model.active_peft_config
    method = method_of(config.peft_type, config.to_dict())
    return method.state if method is not None else None


def save(
    root: Path,
    step: int,
    peft_model: Any,
    optimizer: Any,
    scheduler: Any,
    progress: dict[str, Any],
    fingerprint_: dict[str, Any],
    accelerator: Any,
    keep: int,
) -> Path:
    """Write checkpoint `step` (every process calls this; the main process writes the shared parts)."""
    from safetensors.torch import save_file

    from peftcli.outputs import follow_umask

    layout = Layout(root.parent)  # root: the run's checkpoints/
    target, tmp = layout.checkpoint(step), layout.checkpoint_tmp(step)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    _save_rng(tmp / f"rng-{accelerator.process_index}")
    # Under FSDP the adapter is gathered whole (every process takes part) and the optimizer
    # state is written sharded, one file per process.
    trainable, adapter = sharded.trainable_state(peft_model), sharded.adapter_state(peft_model)
    if adapter is not None:
        optimizer_state = sharded.local_optimizer_state(optimizer)
        torch.save(optimizer_state, tmp / f"optimizer-{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        # loadable with PEFT as it is, on the original base (PiSSA and OLoRA converted)
        save_pretrained(peft_model, checkpoint_adapter(tmp), adapter)
        save_file(trainable, tmp / TRAINABLE)
        if adapter is None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if (extra := _method_state(peft_model)) and (tensors := extra.save(peft_model)) is not None:
            torch.save(tensors, tmp / extra.file)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {"step": step, "progress": progress, "fingerprint": fingerprint_}
        state_file(tmp).write_text(json.dumps(state, indent=1), encoding="utf-8")
        follow_umask(tmp)  # safetensors writes its files 0600
        shutil.rmtree(target, ignore_errors=True)
        os.rename(tmp, target)
        for old in complete(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return target


def restore_trainable(peft_model: Any, saved: dict[str, torch.Tensor]) -> None:
    expected = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    if set(saved) != expected:
        raise RuntimeError(
            f"checkpoint and model differ in trainable tensors: {sorted(set(saved) ^ expected)[:4]}"
        )
    with torch.no_grad():
        params = dict(peft_model.named_parameters())
        for name, value in saved.items():
            sharded.copy_into(params[name], value)


def _device(accelerator: Any) -> torch.device:
    """Where restored tensors go. Processes launched on the CPU get `cpu:0`, which torch.load and
    safetensors do not accept as a location: plain `cpu` is the same memory."""
    device = accelerator.device
    return torch.device("cpu") if device.type == "cpu" else device


def load(
    checkpoint: Path, peft_model: Any, optimizer: Any, scheduler: Any, accelerator: Any
) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and RNG; returns the saved progress."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    if (checkpoint / TRAINABLE).is_file():
        restore_trainable(peft_model, load_file(checkpoint / TRAINABLE))
    else:  # a checkpoint of an earlier peftcli
        weights = load_file(
            adapter_file(checkpoint_adapter(checkpoint), weights=True), device=str(_device(accelerator))
        )
        set_peft_model_state_dict(peft_model, weights)
    # weights_only: tensors and plain containers, never arbitrary pickled objects.
    shard = checkpoint / f"optimizer-{accelerator.process_index}.pt"
    if shard.is_file():  # written sharded, by the same number of processes (the fingerprint says so)
        state = torch.load(shard, map_location=_device(accelerator), weights_only=True)
        sharded.load_local_optimizer_state(optimizer, state)
    else:
        optimizer.load_state_dict(
            torch.load(checkpoint / "optimizer.pt", map_location=_device(accelerator), weights_only=True)
        )
    scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", weights_only=True))
    if (extra := _method_state(peft_model)) and (checkpoint / extra.file).is_file():
        saved = torch.load(checkpoint / extra.file, map_location=_device(accelerator), weights_only=True)
        extra.load(peft_model, saved)
    _load_rng(checkpoint / f"rng-{accelerator.process_index}")
    return read_state(checkpoint)["progress"]


class Checkpointer:
    """What the training loop needs: resume once, save when due, name the last good one."""

    def __init__(
        self,
        root: Path,
        every: int | None,
        keep: int,
        fingerprint_: dict[str, Any],
        accelerator: Any,
        resume_from: Path | None = None,
    ):
        self.root, self.every, self.keep = root, every, keep
        self.fingerprint = fingerprint_
        self.accelerator = accelerator
        self.resume_from = resume_from

    def resume(self, peft_model: Any, optimizer: Any, scheduler: Any) -> dict[str, Any] | None:
        if self.resume_from is None:
            return None
        return load(self.resume_from, peft_model, optimizer, scheduler, self.accelerator)

    def due(self, step: int, total: int) -> bool:
        return bool(self.every) and step % self.every == 0 and step < total

    def save(
        self, step: int, peft_model: Any, optimizer: Any, scheduler: Any, progress: dict[str, Any]
    ) -> None:
        save(
            self.root,
            step,
            peft_model,
            optimizer,
            scheduler,
            progress,
            self.fingerprint,
            self.accelerator,
            self.keep,
        )

    def last_good(self) -> Path | None:
        return latest(self.root)
