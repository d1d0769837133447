"""The reference: its log-probabilities (DPO, KTO), scored once, kept in the run folder, read back
by a resumed run and by `peftcli eval`; or, for GRPO (which scores new completions every step),
the reference model itself, swapped in place (`as_reference`), from the starting adapter's
weights kept in the same run file."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch


@torch.no_grad()
def reference_table(
    objective: Any, peft_model: Any, examples: Any, batch_size: int, accelerator: Any, adapter: bool
) -> torch.Tensor:
    """[examples, 2] reference log-probabilities: (chosen, rejected) of each pair, or (answer,
    mismatched answer) of each KTO example. `adapter`: the reference is the model as it is
    (a starting adapter, before any update); otherwise its adapter is disabled (the base).
    Each process scores every N-th example; one all-reduce assembles the table."""
    n = len(examples)
    table = torch.zeros(n, 2, dtype=torch.float64, device=accelerator.device)
    mine = list(range(accelerator.process_index, n, accelerator.num_processes))
    was_training = peft_model.training
    peft_model.eval()
    try:
        with nullcontext() if adapter else peft_model.disable_adapter():
            for start in range(0, len(mine), batch_size):
                index = mine[start : start + batch_size]
                batch = objective.collate([examples[i] for i in index])
                batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                with accelerator.autocast():
                    values = objective.reference_scores(peft_model, batch)
                table[torch.tensor(index, device=table.device)] = values.double()
    finally:
        peft_model.train(was_training)
    if accelerator.num_processes > 1:
        table = accelerator.reduce(table, "sum")  # every row is filled by exactly one process
    return table.cpu()


def reference_tables(
    objective: Any,
    peft_model: Any,
    splits: dict[str, Sequence[Any]],
    batch_size: int,
    accelerator: Any,
    saved: Path | None,
    must_exist: bool = False,
    start: str | None = None,
    keep: bool = True,
) -> dict[str, torch.Tensor]:
    """The reference of each split: read from `saved` when it holds them all (a resumed run: the
    policy has moved on since; `peftcli eval` of the run's own split), else computed — and, with
    `keep` (training), written there by the main process.

    The reference is what the policy started from: the base (adapter disabled), or with
    `objective.start` its starting adapter — the model as it is before the first update, or,
    after training, `start` loaded beside the trained adapter."""
    from safetensors.torch import load_file, save_file

    from peftcli.outputs import follow_umask

    if saved is not None and saved.is_file():
        tables = load_file(saved)
        if all(k in tables and len(tables[k]) == len(v) for k, v in splits.items()):
            return {k: tables[k] for k in splits}
    if must_exist:
        raise RuntimeError(f"the reference log-probabilities of this run are missing ({saved})")
    with beside(peft_model, start):
        tables = {
            k: reference_table(objective, peft_model, v, batch_size, accelerator, objective.start)
            for k, v in splits.items()
        }
    if saved is not None and keep and accelerator.is_main_process:
        save_file(tables, saved)
        follow_umask(saved)  # safetensors writes its files 0600
    return tables


@contextmanager
def beside(peft_model: Any, start: str | None) -> Iterator[None]:
    """With `start`, the starting adapter loaded beside the trained one and active; as it was after."""
    if start is None:
        yield
        return
    from peftcli.methods.load import adapter_folder, load_adapter

    load_adapter(peft_model, adapter_folder(start), adapter_name="reference")
    peft_model.set_adapter("reference")
    try:
        yield
    finally:
        peft_model.set_adapter("default")
        peft_model.delete_adapter("reference")


def starting_weights(
    peft_model: Any, saved: Path | None, resumed: bool, keep: bool, accelerator: Any
) -> dict[str, torch.Tensor]:
    """GRPO from a starting adapter (peft.init_from): its trainable weights as they are before the
    first update — the reference its KL term pulls towards. Kept at `saved` (by the main process,
    with `keep`) and read back by a resumed run, which must not read the init_from folder again:
    the reference is what this run started from, even if that folder has been trained since."""
    from safetensors.torch import load_file, save_file

    from peftcli.outputs import follow_umask

    if resumed:
        if saved is None or not saved.is_file():
            raise RuntimeError(f"the starting adapter's weights of this run are missing ({saved})")
        return {k: v.to(accelerator.device) for k, v in load_file(saved).items()}
    weights = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    if saved is not None and keep and accelerator.is_main_process:
        save_file({k: v.contiguous().cpu() for k, v in weights.items()}, saved)
        follow_umask(saved)  # safetensors writes its files 0600
    return weights


@contextmanager
def as_reference(peft_model: Any, start: dict[str, torch.Tensor] | None) -> Iterator[None]:
    """The reference model, in place: the base (the adapter disabled), or with `start` the
    starting adapter's weights copied into the trainable ones (and the trained ones back after).
    No second copy of the model; works for every method, prompt learning included."""
    if start is None:
        with peft_model.disable_adapter():
            yield
        return
    params = dict(peft_model.named_parameters())
    trained = {k: params[k].detach().clone() for k in start}
    with torch.no_grad():
        for k, v in start.items():
            params[k].copy_(v)
    try:
        yield
    finally:
        with torch.no_grad():
            for k, v in trained.items():
                params[k].copy_(v)
