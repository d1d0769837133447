"""Training stage: the Accelerate loop, readable top to bottom.

`fit` takes a wrapped model, prepared data, `recipe.training` and the run's objective
(peftcli.objectives: SFT, DPO, ...); it never sees the rest of the recipe, and never asks which
objective it runs. Logging, evaluation and checkpoints are one-line calls into helpers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from peftcli.data.batching import Shard, collator, train_sampler
from peftcli.data.splits import Prepared
from peftcli.errors import Interrupted
from peftcli.training.control import Control
from peftcli.training.window import Finite, Progress, Window, log_row

if TYPE_CHECKING:
    from peftcli.objectives.base import Objective
    from peftcli.recipe import TrainingSection
    from peftcli.training.checkpoint import Checkpointer
    from peftcli.training.tracking import MetricsLog


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


def micro_batch_groups(
    loader: Any, grad_accum: int, steps_per_epoch: int, done: int = 0, shard: Shard | None = None
) -> Iterator[list[dict[str, torch.Tensor]]]:
    """Endless micro-batch groups, one per optimizer step; an epoch's last group may be short.

    `done` optimizer steps are skipped, so a resumed run sees exactly the batches an
    uninterrupted one would (the order of each epoch is seeded by its number). With several
    processes, `shard` masks the examples Accelerate repeats to even out an epoch's last batch."""
    epoch, skip = divmod(done, steps_per_epoch)
    skip *= grad_accum
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        group: list[dict[str, torch.Tensor]] = []
        for index, batch in enumerate(loader):
            if skip:
                skip -= 1
                continue
            group.append(shard.mask_repeats(batch, index) if shard else batch)
            if len(group) == grad_accum:
                yield group
                group = []
        if group:
            yield group
        epoch += 1


def make_optimizer(
    model: Any, section: TrainingSection, lr_ratios: dict | None = None
) -> torch.optim.Optimizer:
    """AdamW; a parameter whose name holds a key of `lr_ratios` learns at lr × its value (LoRA+),
    in a group named by the key (the optimizer's state says who learns how fast)."""
    ratios, wd = lr_ratios or {}, section.weight_decay
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    plain = [p for n, p in named if not any(k in n for k in ratios)]
    groups = [
        {"params": [p for p in plain if p.ndim >= 2], "weight_decay": wd},
        {"params": [p for p in plain if p.ndim < 2], "weight_decay": 0.0},
    ] + [
        {"params": [p for n, p in named if k in n], "weight_decay": wd, "lr": section.lr * r, "name": k}
        for k, r in ratios.items()
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=section.lr)


@dataclass
class Setup:
    """What the loop works with: the prepared model, optimizer, schedule and data, resumed."""

    model: Any  # wrapped by Accelerate (DDP, FSDP)
    optimizer: Any
    scheduler: Any
    peft_model: Any  # the unwrapped PeftModel
    params: list[torch.Tensor]  # the trainable ones, for gradient clipping
    plan: Plan
    done: int  # optimizer steps taken before (a resumed run)
    window: Window
    groups: Iterator[list[dict[str, torch.Tensor]]]


def set_up(
    model: Any,
    data: Prepared,
    section: TrainingSection,
    accelerator: Any,
    objective: Objective,
    checkpoints: Checkpointer | None,
    lr_ratios: dict[str, float] | None,
) -> Setup:
    from transformers import get_scheduler

    if section.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    optimizer = make_optimizer(model, section, lr_ratios)
    model, optimizer, loader = accelerator.prepare(
        model, optimizer, make_loader(data, section, collator(data, accelerator.device, objective.collate))
    )
    p = plan(len(data.train.examples), section, accelerator.num_processes)
    assert p.steps_per_epoch == math.ceil(len(loader) / section.grad_accum), "plan and loader disagree"
    peft_model = accelerator.unwrap_model(model)
    scheduler = get_scheduler(
        section.scheduler, optimizer, num_warmup_steps=p.warmup_steps, num_training_steps=p.total_steps
    )
    params = [q for q in model.parameters() if q.requires_grad]
    saved = checkpoints.resume(peft_model, optimizer, scheduler) if checkpoints else None
    done = saved["step"] if saved else 0
    window = Window(accelerator, objective.sums, objective.counted, saved)
    shard = Shard.of(len(data.train.examples), section.batch_size, accelerator)
    groups = micro_batch_groups(loader, section.grad_accum, p.steps_per_epoch, done, shard)
    return Setup(model, optimizer, scheduler, peft_model, params, p, done, window, groups)


def fit(
    model: Any,
    data: Prepared,
    section: TrainingSection,
    accelerator: Any,
    objective: Objective,
    log: MetricsLog,
    evaluate: Callable[[Any], dict[str, Any]] | None = None,
    on_step: Callable[[Any, int], None] | None = None,
    penalty: Callable[[Any], torch.Tensor] | None = None,
    checkpoints: Checkpointer | None = None,
    control: Control | None = None,
    lr_ratios: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Train; returns a summary (steps, tokens, seconds, last loss).

    `objective` batches the examples, and turns each micro-batch into its loss and sums;
    `on_step(peft_model, step)` runs after each optimizer step while gradients still exist;
    `penalty(peft_model)` is a loss term added once per optimizer step; `checkpoints` saves
    resumable state every `save_every` steps and resumes from the newest one; `control` counts
    the steps taken and stops the loop, checkpointed, after Ctrl-C or SIGTERM; `lr_ratios`: see
    make_optimizer."""
    t = set_up(model, data, section, accelerator, objective, checkpoints, lr_ratios)
    model, p, window, done = t.model, t.plan, t.window, t.done
    progress = Progress(p.total_steps, done, accelerator.is_main_process)
    control = control or Control()

    def state(step: int) -> tuple:  # what a checkpoint of this step holds
        return step, t.peft_model, t.optimizer, t.scheduler, {"step": step, **window.state()}

    model.train()
    finite = Finite(accelerator.device)
    started = time.perf_counter()
    last: dict[str, Any] = {}
    for step in range(done + 1, p.total_steps + 1):
        group, objective.step = next(t.groups), step  # a sampling objective seeds by the step
        sums = backward(model, group, objective, accelerator, penalty, t.peft_model)
        window.add(sums, sum(b["num_tokens"] for b in group))  # on the device: nothing read back
        grad_norm = (
            accelerator.clip_grad_norm_(t.params, section.max_grad_norm) if section.max_grad_norm else None
        )
        finite.note(step, grad_norm)
        t.optimizer.step()
        t.scheduler.step()
        if on_step is not None:
            on_step(t.peft_model, step)
        t.optimizer.zero_grad(set_to_none=True)
        progress.update()

        epoch = round(step / p.steps_per_epoch, 4)
        log_due = step % section.log_every == 0 or step == p.total_steps
        eval_due = bool(section.eval_every) and step % section.eval_every == 0 and step != p.total_steps
        saved_now = checkpoints is not None and checkpoints.due(step, p.total_steps)
        # The host reads the step's numbers only on these steps (on a GPU every read waits for it).
        if sync := log_due or eval_due or saved_now:
            finite.check(checkpoints)
        if log_due:
            last = log_row(step, epoch, window, objective, t.scheduler, grad_norm, checkpoints)
            log.log(last)
            progress.show(last)
        if evaluate is not None and eval_due:
            metrics = {f"eval_{k}": v for k, v in evaluate(model).items() if isinstance(v, float)}
            log.log({"step": step, "epoch": epoch, **metrics})
        if saved_now:
            checkpoints.save(*state(step))
        control.step = step
        if step < p.total_steps and (signal_number := control.stop_requested(accelerator, sync)):
            finite.check(checkpoints)  # before the checkpoint the stop writes
            progress.close()
            raise Interrupted(step, signal_number, save_on_stop(checkpoints, state(step), saved_now))
    progress.close()
    return {
        "steps": p.total_steps,
        "epochs": round(p.total_steps / p.steps_per_epoch, 4),
        "seconds": round(time.perf_counter() - started, 2),
        "tokens": window.total_tokens,
        objective.counted: window.total_counted,
        "final_loss": last.get("loss"),
        "resumed_from": done,
    }


def enable_gradient_checkpointing(model: Any) -> None:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()


def save_on_stop(checkpoints: Checkpointer | None, state: tuple, saved: bool) -> Path | None:
    """When checkpoints are on, the step the run stopped at is checkpointed (once); returns the
    checkpoint to resume from."""
    if checkpoints is None or not checkpoints.every:
        return None
    if not saved:
        checkpoints.save(*state)
    return checkpoints.last_good()


def make_loader(data: Prepared, section: TrainingSection, collate: Callable[[list], Any]) -> Any:
    from torch.utils.data import DataLoader

    sampler = train_sampler(data, section.batch_size, section.seed)  # data.group_by_length
    return DataLoader(
        data.train.examples,
        batch_size=section.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        collate_fn=collate,
        # Its own generator: iterating the data never draws from the global RNG, which
        # dropout uses, so a resumed run draws the same dropout masks.
        generator=torch.Generator().manual_seed(section.seed),
    )


def backward(
    model: Any,
    group: list[dict[str, torch.Tensor]],
    objective: Objective,
    accelerator: Any,
    penalty: Callable[[Any], torch.Tensor] | None,
    peft_model: Any,
) -> dict[str, torch.Tensor]:
    """Forward and backward over one optimizer step's micro-batches, for every objective;
    returns this process's sums for metrics.

    Loss normalisation: the objective divides each micro-batch's loss by what the whole global
    batch holds (all micro-batches, all processes: supervised tokens for SFT, pairs for DPO),
    so gradient accumulation and multi-process runs make the same update as one big batch."""
    step = objective.begin_step(model, group, accelerator)
    sums = objective.zero_sums(accelerator.device)
    for i, batch in enumerate(step.batches):
        sync = i == len(step.batches) - 1
        with nullcontext() if sync else accelerator.no_sync(model), accelerator.autocast():
            loss, batch_sums = objective.loss(model, batch, step)
            # DDP averages gradients over processes; multiply back to get a plain sum.
            loss = loss * accelerator.num_processes
            if penalty is not None and sync:
                loss = loss + penalty(peft_model)
            accelerator.backward(loss)
        for k, v in batch_sums.items():
            sums[k] += v
    if accelerator.is_main_process:  # already global: counted once
        for k, v in step.once.items():
            sums[k] += v
    return sums
