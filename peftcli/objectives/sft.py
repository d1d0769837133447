"""SFT: the task's own loss (next-token cross-entropy on the supervised tokens, seq2seq targets,
class labels), normalised per supervised token of the whole global batch."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from peftcli.data.batching import collate
from peftcli.objectives.base import Batch, Objective, Step
from peftcli.training.evaluate import evaluate
from peftcli.training.losses import loss_sum, supervised_tokens


class SFT(Objective):
    sums = ("loss", "supervised_tokens")
    counted = "supervised_tokens"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.collate = partial(  # type: ignore[method-assign]
            collate, pad_id=self.tokenizer.pad_token_id, processor=getattr(self.tokenizer, "processor", None)
        )

    def begin_step(self, model: Any, group: list[Batch], accelerator: Any) -> Step:
        # Every token loss is divided by the supervised tokens of the whole global batch.
        local = sum(supervised_tokens(b, self.task) for b in group)
        return Step(
            group, {"supervised": accelerator.reduce(local.to(accelerator.device), "sum").clamp(min=1)}
        )

    def loss(self, model: Any, batch: Batch, step: Step) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        summed = loss_sum(model, batch, self.task)
        counted = supervised_tokens(batch, self.task).to(summed.device).double()
        return summed / step.totals["supervised"], {
            "loss": summed.detach().double(),
            "supervised_tokens": counted,
        }

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        return {"loss": sums["loss"] / max(sums["supervised_tokens"], 1)}

    def evaluate(
        self, model: Any, split: Any, accelerator: Any, batch_size: int, final: bool = False
    ) -> dict[str, Any]:
        """Loss and perplexity (classification: accuracy, F1) as the loop goes; at the end the
        recipe's eval.metrics, exact match from greedy generation among them."""
        section = (
            self.eval_section
            if final
            else self.eval_section.model_copy(update={"metrics": ["loss", "perplexity"]})
        )
        return evaluate(model, self.tokenizer, split, section, self.task, accelerator, batch_size)
