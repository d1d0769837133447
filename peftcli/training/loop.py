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
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from peftcli.data.batching import collate, train_sampler
from peftcli.data.splits import Prepared
from peftcli.errors import Interrupted, UserError
from peftcli.training.control import Control
from peftcli.training.losses import IGNORE, loss_sum, supervised_tokens

if TYPE_CHECKING:
    from peftcli.recipe import TrainingSection
    from peftcli.training.checkpoint import Checkpointer
    from peftcli.training.preference import Objective
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


@dataclass
class Shard:
    """Which rows of a process's micro-batches are real examples.

    Accelerate deals the epoch's batches round-robin (batch k of process p is global batch
    k·N + p) and, so that every process steps together, completes the last round with examples
    from the start of the epoch. In that global order the first `examples` slots are the epoch;
    every slot after them is a repeat. Repeats keep their place in the forward and backward
    pass (every process must take part in each gradient all-reduce) but carry no loss and no
    tokens, so an uneven last global batch makes the same update as on one process."""

    examples: int
    batch_size: int
    process: int
    processes: int

    @classmethod
    def of(cls, examples: int, batch_size: int, accelerator: Any) -> Shard | None:
        """The shard of this process, or None on one process (nothing is repeated there)."""
        if accelerator.num_processes == 1:
            return None
        return cls(examples, batch_size, accelerator.process_index, accelerator.num_processes)

    def mask_repeats(self, batch: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
        first = (index * self.processes + self.process) * self.batch_size
        if "pair_mask" in batch:  # preference batches: one mask entry per pair (or KTO answer)
            rows = batch["pair_mask"].shape[0]
        else:
            rows = batch["labels"].shape[0]
        if first + rows <= self.examples:
            return batch
        repeat = torch.arange(first, first + rows, device=batch["labels"].device) >= self.examples
        if "pair_mask" in batch:
            sequences = repeat.repeat(batch["row_tokens"].shape[0] // rows)  # chosen rows, then rejected
            tokens = batch["row_tokens"].masked_fill(sequences, 0)
            mask = batch["pair_mask"].masked_fill(repeat, 0)
            return {**batch, "pair_mask": mask, "row_tokens": tokens, "num_tokens": tokens.sum()}
        labels = batch["labels"].clone()
        labels[repeat] = IGNORE
        tokens = batch["row_tokens"].masked_fill(repeat, 0)
        return {**batch, "labels": labels, "row_tokens": tokens, "num_tokens": tokens.sum()}


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
    """Metrics accumulated between two log rows, plus run totals; checkpointed for resume."""

    def __init__(self, accelerator: Any, saved: dict[str, Any] | None = None, extra: tuple[str, ...] = ()):
        self.accelerator = accelerator
        saved = saved or {}
        # Saved sums are global; only the main process carries them forward.
        own = accelerator.is_main_process
        self.loss = torch.tensor(
            saved.get("loss", 0.0) if own else 0.0, dtype=torch.float64, device=accelerator.device
        )
        self.supervised = torch.tensor(saved.get("supervised", 0) if own else 0, device=accelerator.device)
        self.tokens = torch.tensor(saved.get("tokens", 0) if own else 0, device=accelerator.device)
        self.total_tokens = saved.get("total_tokens", 0)
        self.total_supervised = saved.get("total_supervised", 0)
        # Further sums an objective logs (preference rewards, accuracies), keyed by name.
        kept = saved.get("extra", {}) if own else {}
        self.extra = torch.tensor(
            [kept.get(k, 0.0) for k in extra], dtype=torch.float64, device=accelerator.device
        )
        self.extra_names = extra
        self.closed_extra: dict[str, float] = {}
        self.started = time.perf_counter()

    def add(
        self,
        loss_sum: torch.Tensor,
        supervised: torch.Tensor,
        tokens: int,
        extra: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self.loss += loss_sum
        self.supervised += supervised.to(self.accelerator.device)
        self.tokens += tokens
        if extra:
            self.extra += torch.stack([extra[k] for k in self.extra_names]).to(self.extra)

    def reduced(self) -> tuple[float, int, int, dict[str, float]]:
        r = self.accelerator.reduce
        extra = r(self.extra, "sum").tolist() if self.extra_names else []
        sums = dict(zip(self.extra_names, extra, strict=True))
        return r(self.loss, "sum").item(), int(r(self.supervised, "sum")), int(r(self.tokens, "sum")), sums

    def close(self) -> tuple[float, int, float]:
        """(mean loss per supervised token, tokens, seconds) of the window; starts a new one.
        The window's further sums are left in `closed_extra`."""
        loss, supervised, tokens, self.closed_extra = self.reduced()
        seconds = time.perf_counter() - self.started
        self.total_tokens += tokens
        self.total_supervised += supervised
        for t in (self.loss, self.supervised, self.tokens, self.extra):
            t.zero_()
        self.started = time.perf_counter()
        return loss / max(supervised, 1), tokens, seconds

    def state(self) -> dict[str, Any]:
        loss, supervised, tokens, extra = self.reduced()
        return {
            "loss": loss,
            "supervised": supervised,
            "tokens": tokens,
            "total_tokens": self.total_tokens,
            "total_supervised": self.total_supervised,
            "extra": extra,
        }


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
    checkpoints: Checkpointer | None = None,
    control: Control | None = None,
    objective: Objective | None = None,
    lr_ratios: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Train; returns a summary (steps, tokens, seconds, last loss).

    `on_step(peft_model, step)` runs after each optimizer step while gradients still exist;
    `penalty(peft_model)` is a loss term added once per optimizer step; `checkpoints` saves
    resumable state every `save_every` steps and resumes from the newest one; `control` counts
    the steps taken and stops the loop, checkpointed, after Ctrl-C or SIGTERM; `objective`, a
    preference objective (see training.preference), replaces the task's loss; `lr_ratios`: see make_optimizer."""
    from transformers import get_scheduler

    if section.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    optimizer = make_optimizer(model, section, lr_ratios)
    model, optimizer, loader = accelerator.prepare(
        model, optimizer, make_loader(data, section, pad_id, preference=objective is not None)
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
    window = Window(accelerator, saved, objective.sums if objective else ())
    shard = Shard.of(len(data.train.examples), section.batch_size, accelerator)
    groups = micro_batch_groups(loader, section.grad_accum, p.steps_per_epoch, done, shard)
    progress = Progress(p.total_steps, done, accelerator.is_main_process)
    control = control or Control()

    def state(step: int) -> tuple:  # what a checkpoint of this step holds
        return step, peft_model, optimizer, scheduler, {"step": step, **window.state()}

    model.train()
    started = time.perf_counter()
    last: dict[str, Any] = {}
    for step in range(done + 1, p.total_steps + 1):
        group = next(groups)
        step_loss, counted, extra = train_step(
            model, group, task, accelerator, penalty, peft_model, objective
        )
        window.add(step_loss, counted, sum(int(b["num_tokens"]) for b in group), extra)
        grad_norm = (
            accelerator.clip_grad_norm_(params, section.max_grad_norm) if section.max_grad_norm else None
        )
        if grad_norm is not None and not torch.isfinite(grad_norm):
            diverged(step, f"the gradient norm is {float(grad_norm)}", checkpoints)
        optimizer.step()
        scheduler.step()
        if on_step is not None:
            on_step(peft_model, step)
        optimizer.zero_grad(set_to_none=True)
        progress.update()

        epoch = round(step / p.steps_per_epoch, 4)
        if step % section.log_every == 0 or step == p.total_steps:
            last = log_row(step, epoch, window, objective, scheduler, grad_norm, checkpoints)
            log.log(last)
            progress.show(last)
        if (
            evaluate is not None
            and section.eval_every
            and step % section.eval_every == 0
            and step != p.total_steps
        ):
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
        ("pairs" if objective is not None else "supervised_tokens"): window.total_supervised,
        "final_loss": last.get("loss"),
        "resumed_from": done,
    }


def log_row(
    step: int,
    epoch: float,
    window: Window,
    objective: Objective | None,
    scheduler: Any,
    grad_norm: torch.Tensor | None,
    checkpoints: Checkpointer | None,
) -> dict[str, Any]:
    """The metrics.jsonl row of the window that ends at `step` (a diverged loss stops the run)."""
    loss, tokens, seconds = window.close()
    measured = objective.metrics(window.closed_extra) if objective is not None else {"loss": loss}
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


def make_loader(data: Prepared, section: TrainingSection, pad_id: int, preference: bool = False) -> Any:
    from torch.utils.data import DataLoader

    from peftcli.data.preference import collate_pairs

    sampler = train_sampler(data, section.batch_size, section.seed)  # data.group_by_length
    return DataLoader(
        data.train.examples,
        batch_size=section.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        collate_fn=partial(collate_pairs if preference else collate, pad_id=pad_id),
        # Its own generator: iterating the data never draws from the global RNG, which
        # dropout uses, so a resumed run draws the same dropout masks.
        generator=torch.Generator().manual_seed(section.seed),
    )


def train_step(
    model: Any,
    group: list[dict[str, torch.Tensor]],
    task: str,
    accelerator: Any,
    penalty: Callable[[Any], torch.Tensor] | None,
    peft_model: Any,
    objective: Objective | None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor] | None]:
    """One optimizer step's forward and backward passes: (summed loss, what it is a sum over —
    supervised tokens, or pairs —, the objective's further sums)."""
    if objective is None:
        return (*backward(model, group, task, accelerator, penalty, peft_model), None)
    sums = objective.step(model, group, accelerator, penalty, peft_model)
    return sums["pair_loss"], sums["pairs"].round().long(), sums


def backward(
    model: Any,
    group: list[dict[str, torch.Tensor]],
    task: str,
    accelerator: Any,
    penalty: Callable[[Any], torch.Tensor] | None,
    peft_model: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward over one optimizer step's micro-batches; returns the summed loss
    and this process's supervised tokens.

    Loss normalisation: every token loss is divided by the number of supervised tokens in the
    whole global batch (all micro-batches, all processes), so gradient accumulation and
    multi-process runs make the same update as one big batch."""
    local_sup = sum(supervised_tokens(b, task) for b in group)
    global_sup = accelerator.reduce(local_sup.to(accelerator.device), "sum").clamp(min=1)
    step_loss = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    for i, batch in enumerate(group):
        sync = i == len(group) - 1
        with nullcontext() if sync else accelerator.no_sync(model), accelerator.autocast():
            summed = loss_sum(model, batch, task)
            # DDP averages gradients over processes; multiply back to get a plain sum.
            loss = summed * accelerator.num_processes / global_sup
            if penalty is not None and sync:
                loss = loss + penalty(peft_model)
            accelerator.backward(loss)
        step_loss += summed.detach().double()
    return step_loss, local_sup


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
