"""Training stage: the Accelerate loop, readable top to bottom.

`fit` takes a wrapped model, prepared data and `recipe.training`; it never sees the rest of
the recipe. Logging, evaluation and checkpoints are one-line calls into helpers.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch

from .data import Prepared, collate, train_sampler
from .errors import UserError
from .losses import loss_sum, supervised_tokens

if TYPE_CHECKING:
    from .recipe import TrainingSection
    from .tracking import MetricsLog


@dataclass
class Plan:
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


def plan(num_examples: int, section: TrainingSection, num_processes: int = 1) -> Plan:
    """Optimizer steps for a run, known before the model is built (AdaLoRA schedules over it).

    Each process sees ceil(batches / processes) micro-batches per epoch, as Accelerate shards them."""
    batches = math.ceil(math.ceil(num_examples / section.batch_size) / num_processes)
    per_epoch = math.ceil(batches / section.grad_accum)
    total = section.max_steps or max(1, math.ceil(section.epochs * per_epoch))
    return Plan(per_epoch, total, int(section.warmup_ratio * total))


def micro_batch_groups(loader: Any, grad_accum: int) -> Iterator[list[dict[str, torch.Tensor]]]:
    """Endless micro-batch groups, one per optimizer step; an epoch's last group may be short."""
    epoch = 0
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)  # a new, seeded order every epoch
        group: list[dict[str, torch.Tensor]] = []
        for batch in loader:
            group.append(batch)
            if len(group) == grad_accum:
                yield group
                group = []
        if group:
            yield group
        epoch += 1


def make_optimizer(model: Any, section: TrainingSection) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": section.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=section.lr)


def fit(
    model: Any,
    data: Prepared,
    section: TrainingSection,
    accelerator: Any,
    pad_id: int,
    task: str,
    log: MetricsLog,
    evaluate: Callable[[Any], dict[str, Any]] | None = None,
    on_step: Callable[[Any, int], None] | None = None,
    penalty: Callable[[Any], torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Train; returns a summary (steps, tokens, seconds, last loss).

    `on_step(peft_model, step)` runs after each optimizer step while gradients still exist;
    `penalty(peft_model)` is a loss term added once per optimizer step."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    if section.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    sampler = train_sampler(data, section.batch_size, section.seed)  # data.group_by_length
    loader = DataLoader(
        data.train.examples,
        batch_size=section.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        collate_fn=partial(collate, pad_id=pad_id),
        drop_last=False,
    )
    optimizer = make_optimizer(model, section)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    p = plan(len(data.train.examples), section, accelerator.num_processes)
    assert p.steps_per_epoch == math.ceil(len(loader) / section.grad_accum), "plan and loader disagree"
    peft_model = accelerator.unwrap_model(model)
    scheduler = get_scheduler(
        section.scheduler, optimizer, num_warmup_steps=p.warmup_steps, num_training_steps=p.total_steps
    )
    params = [q for q in model.parameters() if q.requires_grad]

    model.train()
    # A live bar on a terminal; in logs (CI, SLURM, pipes) one line per logged step instead.
    interactive = sys.stderr.isatty()
    bar = tqdm(
        total=p.total_steps,
        desc="train",
        unit="step",
        file=sys.stderr,
        dynamic_ncols=True,
        disable=not (accelerator.is_main_process and interactive),
    )
    groups = micro_batch_groups(loader, section.grad_accum)
    window_loss = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    window_sup = torch.zeros((), dtype=torch.long, device=accelerator.device)
    window_tokens = 0
    totals = {"tokens": 0, "supervised_tokens": 0}
    started = window_start = time.perf_counter()
    last: dict[str, Any] = {}
    for step in range(1, p.total_steps + 1):
        group = next(groups)
        # Loss normalisation: every token loss is divided by the number of supervised tokens
        # in the whole global batch (all micro-batches, all processes), so gradient
        # accumulation and multi-process runs make the same update as one big batch.
        local_sup = sum(supervised_tokens(b, task) for b in group)
        global_sup = accelerator.reduce(local_sup.to(accelerator.device), "sum").clamp(min=1)
        for i, batch in enumerate(group):
            sync = i == len(group) - 1
            with nullcontext() if sync else accelerator.no_sync(model), accelerator.autocast():
                summed = loss_sum(model, batch, task)
                # DDP averages gradients over processes; multiply back to get a plain sum.
                loss = summed * accelerator.num_processes / global_sup
                if penalty is not None and sync:
                    loss = loss + penalty(peft_model)
                accelerator.backward(loss)
            window_loss += summed.detach().double()
        window_sup += local_sup.to(accelerator.device)
        window_tokens += sum(int(b["num_tokens"]) for b in group)
        grad_norm = (
            accelerator.clip_grad_norm_(params, section.max_grad_norm) if section.max_grad_norm else None
        )
        optimizer.step()
        scheduler.step()
        if on_step is not None:
            on_step(peft_model, step)
        optimizer.zero_grad(set_to_none=True)
        bar.update(1)

        if step % section.log_every == 0 or step == p.total_steps:
            loss = (
                accelerator.reduce(window_loss, "sum") / accelerator.reduce(window_sup, "sum").clamp(min=1)
            ).item()
            if not math.isfinite(loss):
                raise UserError(
                    f"training diverged: loss is {loss} at step {step}; nothing was saved",
                    "lower training.lr or set training.max_grad_norm",
                )
            tokens = int(accelerator.reduce(torch.tensor(window_tokens, device=accelerator.device), "sum"))
            elapsed = time.perf_counter() - window_start
            totals["tokens"] += tokens
            totals["supervised_tokens"] += int(accelerator.reduce(window_sup, "sum"))
            last = {
                "step": step,
                "epoch": round(step / p.steps_per_epoch, 4),
                "loss": loss,
                "lr": scheduler.get_last_lr()[0],
                "tokens": totals["tokens"],
                "tokens_per_s": round(tokens / max(elapsed, 1e-9), 1),
            }
            if grad_norm is not None:
                last["grad_norm"] = float(grad_norm)
            log.log(last)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{last['lr']:.2e}", tok_s=f"{last['tokens_per_s']:.0f}")
            if accelerator.is_main_process and not interactive:
                print(
                    f"step {step}/{p.total_steps}  loss {loss:.4f}  lr {last['lr']:.2e}  "
                    f"{last['tokens_per_s']:.0f} tok/s",
                    file=sys.stderr,
                    flush=True,
                )
            window_loss.zero_()
            window_sup.zero_()
            window_tokens, window_start = 0, time.perf_counter()
        if (
            evaluate is not None
            and section.eval_every
            and step % section.eval_every == 0
            and step != p.total_steps
        ):
            log.log(
                {
                    "step": step,
                    "epoch": round(step / p.steps_per_epoch, 4),
                    **{f"eval_{k}": v for k, v in evaluate(model).items() if isinstance(v, float)},
                }
            )
    bar.close()
    return {
        "steps": p.total_steps,
        "epochs": round(p.total_steps / p.steps_per_epoch, 4),
        "seconds": round(time.perf_counter() - started, 2),
        **totals,
        "final_loss": last.get("loss"),
    }
