"""The one interface every training objective has (SFT, DPO, ORPO, SimPO, KTO, and the next).

`training.loop.fit` never asks which objective it runs. Per optimizer step it calls
`begin_step` once with the step's micro-batches (the objective sums what it normalises over
across the whole global batch, in one all-reduce), then for each micro-batch `loss`, and does
the backward pass itself: accumulation, `no_sync`, DDP's averaging undone, the method's
penalty — one routine for every objective. `metrics` turns the summed `sums` of a log window
(or of an evaluation) into the logged numbers; `evaluate` scores a whole split.

An objective that generates (online RL with rewards, GRPO) fits the same shape: `begin_step`
may sample completions with the model and its tokenizer, score them, and return them as the
step's batches, with its advantages in `totals`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

Batch = dict[str, torch.Tensor]


@dataclass
class Step:
    """One optimizer step as its objective prepared it, before the first backward pass."""

    batches: list[Batch]  # the micro-batches to run forward and backward, in order
    totals: dict[str, Any]  # what the losses are normalised by: sums over the whole global batch
    once: dict[str, Any] = field(default_factory=dict)  # sums counted once per step (already global)


class Objective:
    """What one objective does; the loop, the evaluator and `peftcli eval` call only this."""

    name: str
    sums: tuple[str, ...]  # what a step or an evaluation adds up (float64); metrics are ratios of them
    counted: str  # the sum the run's summary totals (supervised_tokens, pairs)
    step: int = 0  # the optimizer step being taken (the loop sets it; GRPO seeds its sampling by it)

    def __init__(
        self,
        name: str,
        task: str,
        tokenizer: Any,
        eval_section: Any,
        preference: Any = None,
        start: bool = False,
        grpo: Any = None,
    ):
        """`name`'s objective for a model of `task` and its tokenizer; `eval_section`,
        `preference` and `grpo` are the recipe's sections (each objective reads its own);
        `start`: the run starts from an adapter (peft.init_from), which is then the reference."""
        self.name, self.task, self.tokenizer, self.eval_section = name, task, tokenizer, eval_section
        self.preference, self.grpo, self.start = preference, grpo, start

    def collate(self, examples: list[dict[str, Any]]) -> Batch:
        """A micro-batch of the objective's examples (the training and evaluation loaders use it)."""
        raise NotImplementedError

    def prepare(
        self,
        model: Any,
        splits: dict[str, Any],
        accelerator: Any,
        batch_size: int,
        saved: Path | None,
        resumed: bool = False,
        start: str | None = None,
        keep: bool = True,
    ) -> None:
        """Once, before the first step (or an evaluation): what the objective needs beyond the
        examples of `splits` (DPO, KTO: the reference's log-probabilities, kept at `saved` so that
        a resumed run and `peftcli eval` read them back; see objectives.reference)."""

    def begin_step(self, model: Any, group: list[Batch], accelerator: Any) -> Step:
        raise NotImplementedError

    def loss(self, model: Any, batch: Batch, step: Step) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One micro-batch: its loss, already divided by the step's global totals (so the backward
        passes of all micro-batches and processes add up to the global batch's mean), and its
        sums for metrics (detached, float64)."""
        raise NotImplementedError

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        raise NotImplementedError

    def evaluate(
        self, model: Any, split: Any, accelerator: Any, batch_size: int, final: bool = False
    ) -> dict[str, Any]:
        """The objective's metrics over a whole split (`final`: the recipe's eval.metrics, at the
        end of training; otherwise the cheap ones the loop logs every eval_every steps)."""
        raise NotImplementedError

    def zero_sums(self, device: Any) -> dict[str, torch.Tensor]:
        return {k: torch.zeros((), dtype=torch.float64, device=device) for k in self.sums}
