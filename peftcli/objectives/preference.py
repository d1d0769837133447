"""What the preference objectives share (DPO and its loss variants, ORPO, SimPO: pairs.py; KTO:
kto.py): answers scored by their summed log-probability, the reference, the global batch's
denominators, evaluation over a split.

Every answer is scored by its summed log-probability under the policy (the trained model) and,
for DPO and KTO, under the reference: what the policy starts from — the base with the trainable
adapter disabled, or, with `peft.init_from`, the starting adapter itself before any update.
The reference is computed once over the data before the first step (reference.py), under
no_grad and in eval mode, and stored in the run folder: no second copy of the model, one
forward pass per answer, and a resumed run reads it back.

Normalisation, as for SFT: every pair's loss is divided by the number of pairs in the whole
global batch (all micro-batches, all processes), ORPO's likelihood term by the chosen answers'
tokens in it, and KTO's KL estimate is the mean over it — so gradient accumulation and several
processes make the same update as one big batch. The formulas are TRL's (trl 1.16), which the
suite checks step for step.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from peftcli.data.batching import Shard, collate_pairs
from peftcli.objectives import OBJECTIVES
from peftcli.objectives.base import Batch, Objective, Step
from peftcli.tasks import IGNORE
from peftcli.training.losses import at_least_float32, supervised_logits

if TYPE_CHECKING:
    from peftcli.recipe import PreferenceSection

# Sums a step (or an evaluation) accumulates; metrics are ratios of them (see `metrics`).
SUMS = (
    "pairs",
    "pair_loss",
    "nll",
    "chosen_tokens",
    "rewards_chosen",
    "rewards_rejected",
    "reward_correct",
    "logps_chosen",
    "logps_rejected",
    "preferred",
    "desirable",
    "undesirable",
    "kl",
    "kl_steps",
)


def sequence_logps(model: Any, batch: Batch, prefix: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each row's supervised tokens, and their count, per row."""
    inputs = {k: batch[prefix + k] for k in ("input_ids", "attention_mask", "labels")}
    logits, targets, rows = supervised_logits(model, inputs)
    logits = at_least_float32(logits)
    token_logps = logits.gather(-1, targets[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)
    n = inputs["labels"].shape[0]
    sums = torch.zeros(n, dtype=token_logps.dtype, device=token_logps.device).index_add(0, rows, token_logps)
    counts = torch.bincount(rows, minlength=n).to(token_logps.dtype)
    return sums, counts


@dataclass
class Scores:
    """One micro-batch's pairs (or KTO answers): per-row tensors."""

    chosen: torch.Tensor
    rejected: torch.Tensor | None
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor | None
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None


class Preference(Objective):
    """The shared part; a subclass scores its batches (`batch_sums`, `reference_scores`; KTO's
    `kl_sum`) and says what its sums mean (`metrics`)."""

    sums = SUMS
    counted = "pairs"
    nll_weight = 0.0  # weight of the chosen answers' SFT loss (mean per token)

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.section: PreferenceSection = self.preference
        self.wanted = list(self.eval_section.metrics or OBJECTIVES[self.name].metrics)  # a final evaluation's
        self.reference: dict[str, torch.Tensor] | None = None  # split → [examples, 2] log-probs
        self.collate = partial(collate_pairs, pad_id=self.tokenizer.pad_token_id)  # type: ignore[method-assign]

    # ---- what a subclass defines

    def batch_sums(
        self, model: Any, batch: Batch, split: str, kl: torch.Tensor | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The batch's loss terms with their gradients (summed pair losses; `nll`, the chosen
        answers' summed negative log-likelihood, where it is weighted in), masked so that
        repeated examples count nothing; and its sums for metrics (detached, float64)."""
        raise NotImplementedError

    def reference_scores(self, model: Any, batch: Batch) -> torch.Tensor:
        """[rows, 2]: what the reference table keeps of a batch."""
        raise NotImplementedError

    def kl_sum(self, model: Any, batch: Batch, split: str) -> torch.Tensor | None:
        return None  # KTO's KL estimate; pairs have none

    # ---- the reference

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
        from peftcli.console import say
        from peftcli.objectives.reference import reference_tables

        if not OBJECTIVES[self.name].reference:
            return
        if keep and accelerator.is_main_process:
            say("peftcli: scoring the data with the reference model (once)")
        # A resumed run from a starting adapter cannot score it again: the policy has moved on.
        must_exist = resumed and self.start
        self.reference = reference_tables(
            self, model, splits, batch_size, accelerator, saved, must_exist, start, keep
        )
        accelerator.wait_for_everyone()

    def reference_of(self, batch: Batch, split: str) -> torch.Tensor | None:
        if self.reference is None:
            return None
        table = self.reference[split]
        return table[batch["index"].cpu()].to(batch["input_ids"].device)

    # ---- one optimizer step

    def global_totals(self, model: Any, batches: list[Batch], accelerator: Any, split: str) -> torch.Tensor:
        """Pairs, chosen tokens (where an SFT term is weighted in) and the KL estimate's sum
        (KTO) of the whole global batch, in one all-reduce."""
        local = torch.zeros(3, dtype=torch.float64, device=accelerator.device)
        for b in batches:
            local[0] += b["pair_mask"].sum()
            if self.nll_weight:
                half = b["labels"].shape[0] // 2
                chosen_tokens = (b["labels"][:half, 1:] != IGNORE).sum(dim=1)
                local[1] += (chosen_tokens * b["pair_mask"]).sum()
            if (kl := self.kl_sum(model, b, split)) is not None:
                local[2] += kl
        return accelerator.reduce(local, "sum") if accelerator.num_processes > 1 else local

    def kl_estimate(self, totals: torch.Tensor) -> torch.Tensor | None:
        return None

    def begin_step(self, model: Any, group: list[Batch], accelerator: Any) -> Step:
        totals = self.global_totals(model, group, accelerator, "train")
        kl = self.kl_estimate(totals)
        return Step(
            group,
            {"pairs": totals[0].clamp(min=1), "chosen_tokens": totals[1].clamp(min=1), "kl": kl},
            # the step's KL estimate, already global: counted once
            {} if kl is None else {"kl": kl, "kl_steps": 1},
        )

    def loss(self, model: Any, batch: Batch, step: Step) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        terms, sums = self.batch_sums(model, batch, "train", step.totals["kl"])
        loss = terms["pair_loss"] / step.totals["pairs"].to(terms["pair_loss"].dtype)
        if "nll" in terms:
            loss = loss + self.nll_weight * terms["nll"] / step.totals["chosen_tokens"].to(loss.dtype)
        return loss, sums

    def loss_of(self, sums: dict[str, float]) -> float:
        loss = sums.get("pair_loss", 0.0) / max(sums.get("pairs", 0.0), 1.0)
        if self.nll_weight:
            loss += self.nll_weight * sums.get("nll", 0.0) / max(sums.get("chosen_tokens", 0.0), 1.0)
        return loss

    # ---- evaluation

    @torch.no_grad()
    def evaluate(
        self,
        model: Any,
        split: Any,
        accelerator: Any,
        batch_size: int,
        final: bool = False,
        name: str = "eval",
    ) -> dict[str, Any]:
        """The metrics over a whole split (sums over every pair, not means of batches)."""
        from torch.utils.data import DataLoader

        examples = split.examples
        loader = accelerator.prepare(DataLoader(examples, batch_size=batch_size, collate_fn=self.collate))
        was_training = model.training
        model.eval()
        sums = self.zero_sums(accelerator.device)
        shard = Shard.of(len(examples), batch_size, accelerator)
        # Accelerate evens out the last round of batches with repeats; they count nothing.
        batches = [shard.mask_repeats(b, k) if shard else b for k, b in enumerate(loader)]
        kl = self.kl_estimate(self.global_totals(model, batches, accelerator, name))
        for batch in batches:
            with accelerator.autocast():
                _, batch_sums = self.batch_sums(model, batch, name, kl)
            for k, v in batch_sums.items():
                sums[k] += v
        model.train(was_training)
        stacked = torch.stack([sums[k] for k in self.sums])
        if accelerator.num_processes > 1:
            stacked = accelerator.reduce(stacked, "sum")
        metrics = self.metrics(dict(zip(self.sums, stacked.tolist(), strict=True)))
        if kl is not None:
            metrics["kl"] = float(kl)
        if final:
            metrics = {
                k: v for k, v in metrics.items() if k in self.wanted or k.startswith(("rewards_", "logps_"))
            }
        return metrics | {"examples": len(examples)}
