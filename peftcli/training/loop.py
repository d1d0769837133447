"""Training stage: the Accelerate loop, readable top to bottom.

`fit` takes a wrapped model, prepared data, `recipe.training` and the run's objective
(peftcli.objectives: SFT, DPO, ...); it never sees the rest of the recipe, and never asks which
objective it runs. Logging, evaluation and checkpoints are one-line calls into helpers.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from peftcli.data.batching import Shard, collator, train_sampler
from peftcli.data.splits import Prepared
from peftcli.errors import Interrupted, UserError
from peftcli.training.control import Control

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


class Window:
    """The objective's sums between two log rows, plus run totals; checkpointed for resume."""

    def __init__(
        self, accelerator: Any, names: tuple[str, ...], counted: str, saved: dict[str, Any] | None = None
    ):
        self.accelerator, self.names, self.counted = accelerator, names, counted
        saved = saved or {}
        if "sums" not in saved:  # a checkpoint of peftcli before objectives were one interface
            old = {"loss": saved.get("loss", 0.0), "supervised_tokens": saved.get("supervised", 0)}
            saved = {
                **saved,
                "sums": {**old, **saved.get("extra", {})},
                "total_counted": saved.get("total_supervised", 0),
            }
        # Saved sums are global; only the main process carries them forward.
        kept = saved["sums"] if accelerator.is_main_process else {}
        device = accelerator.device
        self.sums = torch.tensor([kept.get(k, 0.0) for k in names], dtype=torch.float64, device=device)
        self.tokens = torch.tensor(
            saved.get("tokens", 0) if accelerator.is_main_process else 0, device=device
        )
        self.total_tokens = saved.get("total_tokens", 0)
        self.total_counted = saved.get("total_counted", 0)
        self.started = time.perf_counter()

    def add(self, sums: dict[str, torch.Tensor], tokens: int) -> None:
        self.sums += torch.stack([sums[k] for k in self.names]).to(self.sums)
        self.tokens += tokens

    def reduced(self) -> tuple[dict[str, float], int]:
        r = self.accelerator.reduce
        return dict(zip(self.names, r(self.sums, "sum").tolist(), strict=True)), int(r(self.tokens, "sum"))

    def close(self) -> tuple[dict[str, float], int, float]:
        """(the window's sums, tokens, seconds); starts a new one."""
        sums, tokens = self.reduced()
        seconds = time.perf_counter() - self.started
        self.total_tokens += tokens
        self.total_counted += int(round(sums[self.counted]))
        self.sums.zero_()
        self.tokens.zero_()
        self.started = time.perf_counter()
        return sums, tokens, seconds

    def state(self) -> dict[str, Any]:
        sums, tokens = self.reduced()
        return {
            "sums": sums,
            "tokens": tokens,
            "total_tokens": self.total_tokens,
            "total_counted": self.total_counted,
        }


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
    started = time.perf_counter()
    last: dict[str, Any] = {}
    for step in range(done + 1, p.total_steps + 1):
        group = next(t.groups)
        objective.step = step
        sums = backward(model, group, objective, accelerator, penalty, t.peft_model)
        window.add(sums, sum(int(b["num_tokens"]) for b in group))
        grad_norm = (
            accelerator.clip_grad_norm_(t.params, section.max_grad_norm) if section.max_grad_norm else None
        )
        if grad_norm is not None and not torch.isfinite(grad_norm):
            diverged(step, f"the gradient norm is {float(grad_norm)}", checkpoints)
        t.optimizer.step()
        t.scheduler.step()
        if on_step is not None:
            on_step(t.peft_model, step)
        t.optimizer.zero_grad(set_to_none=True)
        progress.update()

        epoch = round(step / p.steps_per_epoch, 4)
        if step % section.log_every == 0 or step == p.total_steps:
            last = log_row(step, epoch, window, objective, t.scheduler, grad_norm, checkpoints)
            log.log(last)
            progress.show(last)
        eval_due = section.eval_every and step % section.eval_every == 0 and step != p.total_steps
        if evaluate is not None and eval_due:
            metrics = {f"eval_{k}": v for k, v in evaluate(model).items() if isinstance(v, float)}
            log.log({"step": step, "epoch": epoch, **metrics})
        saved_now = checkpoints is not None and checkpoints.due(step, p.total_steps)
        if saved_now:
            checkpoints.save(*state(step))
        control.step = step
        if step < p.total_steps and (signal_number := control.stop_requested(accelerator)):
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


def log_row(
    step: int,
    epoch: float,
    window: Window,
    objective: Objective,
    scheduler: Any,
    grad_norm: torch.Tensor | None,
    checkpoints: Checkpointer | None,
) -> dict[str, Any]:
    """The metrics.jsonl row of the window that ends at `step` (a diverged loss stops the run)."""
    sums, tokens, seconds = window.close()
    measured = objective.metrics(sums)
    if not math.isfinite(measured["loss"]):
        diverged(step, f"the loss is {measured['loss']}", checkpoints)
    row = {"step": step, "epoch": epoch, **measured, "lr": scheduler.get_last_lr()[0]}
    row.update(tokens=window.total_tokens, tokens_per_s=round(tokens / max(seconds, 1e-9), 1))
    if grad_norm is not None:
        row["grad_norm"] = float(grad_norm)
    return row


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


class Progress:
    """A live bar on a terminal; in logs (CI, SLURM, pipes) one line per logged step instead.
    Only the main process shows anything."""

    def __init__(self, total: int, done: int, main: bool):
        from tqdm.auto import tqdm

        self.total, self.main = total, main
        self.interactive = sys.stderr.isatty()
        self.bar = tqdm(
            total=total,
            initial=done,
            desc="train",
            unit="step",
            file=sys.stderr,
            dynamic_ncols=True,
            disable=not (main and self.interactive),
        )

    def update(self) -> None:
        self.bar.update(1)

    def show(self, row: dict[str, Any]) -> None:
        loss, lr, speed = row["loss"], row["lr"], row["tokens_per_s"]
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{speed:.0f}")
        if self.main and not self.interactive:
            line = f"step {row['step']}/{self.total}  loss {loss:.4f}  lr {lr:.2e}  {speed:.0f} tok/s"
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        self.bar.close()


def diverged(step: int, what: str, checkpoints: Checkpointer | None) -> None:
    good = checkpoints.last_good() if checkpoints else None
    raise UserError(
        f"training diverged at step {step}: {what}; the adapter was not saved"
        + (f"; the last good checkpoint is {good}" if good else ""),
        "lower training.lr or set training.max_grad_norm" + (", then --resume" if good else ""),
    )
