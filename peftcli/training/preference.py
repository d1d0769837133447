"""Preference objectives (DPO and its loss variants, ORPO, SimPO, KTO) in peftcli's own loop.

Every answer is scored by its summed log-probability under the policy (the trained model) and,
for DPO and KTO, under the reference: what the policy starts from — the base with the trainable
adapter disabled, or, with `peft.init_from`, the starting adapter itself before any update.
The reference is computed once over the data before the first step (`reference_table`), under
no_grad and in eval mode, and stored in the run folder: no second copy of the model, one
forward pass per answer, and a resumed run reads it back.

Normalisation, as for SFT: every pair's loss is divided by the number of pairs in the whole
global batch (all micro-batches, all processes), ORPO's likelihood term by the chosen answers'
tokens in it, and KTO's KL estimate is the mean over it — so gradient accumulation and several
processes make the same update as one big batch. The formulas are TRL's (trl 1.16), which the
suite checks step for step.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from peftcli.tasks import IGNORE
from peftcli.training.losses import at_least_float32, supervised_logits

if TYPE_CHECKING:
    from peftcli.recipe import PreferenceSection

# Sums a step (or an evaluation) accumulates; metrics are ratios of them (see `Objective.metrics`).
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


def sequence_logps(
    model: Any, batch: dict[str, torch.Tensor], prefix: str = ""
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each row's supervised tokens, and their count, per row."""
    inputs = {k: batch[prefix + k] for k in ("input_ids", "attention_mask", "labels")}
    logits, targets, rows = supervised_logits(model, inputs)
    logits = at_least_float32(logits)
    token_logps = logits.gather(-1, targets[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)
    n = inputs["labels"].shape[0]
    sums = torch.zeros(n, dtype=token_logps.dtype, device=token_logps.device).index_add(0, rows, token_logps)
    counts = torch.bincount(rows, minlength=n).to(token_logps.dtype)
    return sums, counts


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x < 0, without cancellation on either side of −ln 2."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def smoothed(logits: torch.Tensor, epsilon: float) -> torch.Tensor:
    """−(1−ε)·log σ(x) − ε·log σ(−x): the sigmoid loss with labels flipped at rate ε."""
    return -(1 - epsilon) * F.logsigmoid(logits) - epsilon * F.logsigmoid(-logits)


@dataclass
class Scores:
    """One micro-batch's pairs (or KTO answers): per-row tensors."""

    chosen: torch.Tensor
    rejected: torch.Tensor | None
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor | None
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None


@dataclass
class Objective:
    """A preference objective's per-pair losses, rewards and metrics; `step` runs one optimizer
    step's forward and backward passes."""

    name: str
    section: PreferenceSection
    reference: dict[str, torch.Tensor] | None = None  # split → [examples, 2] reference log-probs
    sums: tuple[str, ...] = field(default=SUMS)

    @property
    def paired(self) -> bool:
        return self.name != "kto"

    @property
    def nll_weight(self) -> float:
        """Weight of the chosen answers' SFT loss (mean per token): ORPO's own; sft_weight for DPO
        (RPO) and SimPO (CPO's behaviour-cloning term)."""
        if self.name == "orpo":
            return 1.0
        return self.section.sft_weight if self.name in ("dpo", "simpo") else 0.0

    # ---- the losses (per pair, or per KTO answer)

    def losses(self, s: Scores) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, chosen reward, rejected reward) per pair; KTO: (loss, reward, reward)."""
        p = self.section
        beta, eps = p.beta, p.label_smoothing
        if self.name == "dpo":
            chosen_ratio, rejected_ratio = s.chosen - s.ref_chosen, s.rejected - s.ref_rejected
            delta = chosen_ratio - rejected_ratio
            if p.loss_type == "sigmoid":
                loss = smoothed(beta * delta, eps)
            elif p.loss_type == "hinge":
                loss = torch.relu(1 - beta * delta)
            elif p.loss_type == "ipo":  # per-token log-ratios (TRL, confirmed with IPO's authors)
                gap = chosen_ratio / s.chosen_tokens.clamp(min=1) - rejected_ratio / s.rejected_tokens.clamp(
                    min=1
                )
                loss = (gap - 1 / (2 * beta)) ** 2
            else:  # robust
                loss = (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (
                    1 - 2 * eps
                )
            return loss, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
        if self.name in ("simpo", "orpo"):
            mean_c = s.chosen / s.chosen_tokens.clamp(min=1)
            mean_r = s.rejected / s.rejected_tokens.clamp(min=1)
            if self.name == "simpo":
                loss = smoothed(beta * (mean_c - mean_r - p.gamma / beta), eps)
                return loss, beta * mean_c.detach(), beta * mean_r.detach()
            log_odds = (mean_c - mean_r) - (log1mexp(mean_c) - log1mexp(mean_r))
            lam = p.orpo_lambda
            return -lam * F.logsigmoid(log_odds), lam * mean_c.detach(), lam * mean_r.detach()
        raise ValueError(f"{self.name} scores unpaired answers: see kto_losses")

    def kto_losses(
        self, s: Scores, desirable: torch.Tensor, kl: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.section
        ratio = s.chosen - s.ref_chosen
        up = p.desirable_weight * (1 - torch.sigmoid(p.beta * (ratio - kl)))
        down = p.undesirable_weight * (1 - torch.sigmoid(p.beta * (kl - ratio)))
        return torch.where(desirable, up, down), p.beta * ratio.detach()

    # ---- one micro-batch

    def score(self, model: Any, batch: dict[str, torch.Tensor], split: str) -> Scores:
        logps, tokens = sequence_logps(model, batch)
        ref = self.reference_of(batch, split)
        if not self.paired:
            return Scores(logps, None, tokens, None, None if ref is None else ref[:, 0])
        c, r = logps.chunk(2)
        tc, tr = tokens.chunk(2)
        if ref is None:
            return Scores(c, r, tc, tr)
        return Scores(c, r, tc, tr, ref[:, 0], ref[:, 1])

    def reference_of(self, batch: dict[str, torch.Tensor], split: str) -> torch.Tensor | None:
        if self.reference is None:
            return None
        table = self.reference[split]
        return table[batch["index"].cpu()].to(batch["input_ids"].device)

    def batch_sums(
        self, model: Any, batch: dict[str, torch.Tensor], split: str, kl: torch.Tensor | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The batch's loss terms with their gradients — summed pair losses, and for ORPO the
        chosen answers' summed negative log-likelihood — masked so that repeated examples count
        nothing; and its sums for metrics (detached, float64)."""
        s = self.score(model, batch, split)
        mask = batch["pair_mask"].to(s.chosen.dtype)
        out: dict[str, torch.Tensor] = {"pairs": mask.sum()}
        if self.paired:
            loss, reward_c, reward_r = self.losses(s)
            out.update(
                rewards_chosen=(reward_c * mask).sum(),
                rewards_rejected=(reward_r * mask).sum(),
                reward_correct=((reward_c > reward_r) * mask).sum(),
                logps_chosen=(s.chosen.detach() * mask).sum(),
                logps_rejected=(s.rejected.detach() * mask).sum(),
                preferred=((s.chosen > s.rejected) * mask).sum(),
            )
            if self.nll_weight:
                out["nll"] = -(s.chosen * mask).sum()
                out["chosen_tokens"] = (s.chosen_tokens * mask).sum()
        else:
            desirable = batch["desirable"].to(s.chosen.device)
            loss, reward = self.kto_losses(
                s, desirable, kl if kl is not None else torch.zeros((), device=s.chosen.device)
            )
            up, down = desirable.to(mask.dtype) * mask, (~desirable).to(mask.dtype) * mask
            out.update(
                rewards_chosen=(reward * up).sum(),
                rewards_rejected=(reward * down).sum(),
                reward_correct=(((reward > 0) == desirable) * mask).sum(),
                desirable=up.sum(),
                undesirable=down.sum(),
                logps_chosen=(s.chosen.detach() * up).sum(),
                logps_rejected=(s.chosen.detach() * down).sum(),
            )
        out["pair_loss"] = (loss * mask).sum()
        terms = {k: out[k] for k in ("pair_loss", "nll") if k in out}
        return terms, {k: v.detach().double() for k, v in out.items()}

    def kl_sums(self, model: Any, batch: dict[str, torch.Tensor], split: str) -> torch.Tensor:
        """KTO: Σ (log π − log π_ref) over the batch's mismatched answers (no gradient)."""
        with torch.no_grad():
            logps, _ = sequence_logps(model, batch, "kl_")
        ref = self.reference_of(batch, split)[:, 1]
        mask = batch["pair_mask"].to(logps.dtype)
        return ((logps - ref) * mask).sum().double()

    def kl_estimate(self, total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        return (total / count.clamp(min=1)).clamp(min=0)

    # ---- metrics from sums

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        pairs = max(sums.get("pairs", 0.0), 1.0)
        loss = sums.get("pair_loss", 0.0) / pairs
        if self.nll_weight:
            loss += self.nll_weight * sums.get("nll", 0.0) / max(sums.get("chosen_tokens", 0.0), 1.0)
        out = {"loss": loss}
        if self.paired:
            chosen, rejected = sums["rewards_chosen"] / pairs, sums["rewards_rejected"] / pairs
            out.update(
                preference_accuracy=sums["preferred"] / pairs,
                reward_accuracy=sums["reward_correct"] / pairs,
                reward_margin=chosen - rejected,
                rewards_chosen=chosen,
                rewards_rejected=rejected,
                logps_chosen=sums["logps_chosen"] / pairs,
                logps_rejected=sums["logps_rejected"] / pairs,
            )
        else:
            up, down = max(sums["desirable"], 1.0), max(sums["undesirable"], 1.0)
            chosen, rejected = sums["rewards_chosen"] / up, sums["rewards_rejected"] / down
            out.update(
                reward_accuracy=sums["reward_correct"] / pairs,
                reward_margin=chosen - rejected,
                rewards_chosen=chosen,
                rewards_rejected=rejected,
                logps_chosen=sums["logps_chosen"] / up,
                logps_rejected=sums["logps_rejected"] / down,
            )
            if sums.get("kl_steps"):
                out["kl"] = sums["kl"] / sums["kl_steps"]
        return out

    # ---- one optimizer step

    def step(
        self,
        model: Any,
        group: list[dict[str, torch.Tensor]],
        accelerator: Any,
        penalty: Callable[[Any], torch.Tensor] | None,
        peft_model: Any,
    ) -> dict[str, torch.Tensor]:
        """Forward and backward over one optimizer step's micro-batches; returns this process's
        sums for metrics (the loss sum included)."""
        device = accelerator.device
        # Denominators of the whole global batch, in one all-reduce: pairs, chosen tokens (ORPO),
        # and for KTO the KL estimate's sum.
        local = torch.zeros(3, dtype=torch.float64, device=device)
        for b in group:
            local[0] += b["pair_mask"].sum()
            if self.nll_weight:
                half = b["labels"].shape[0] // 2
                chosen_tokens = (b["labels"][:half, 1:] != IGNORE).sum(dim=1)
                local[1] += (chosen_tokens * b["pair_mask"]).sum()
            if self.name == "kto":
                local[2] += self.kl_sums(model, b, "train")
        totals = accelerator.reduce(local, "sum") if accelerator.num_processes > 1 else local
        pairs, chosen_tokens = totals[0].clamp(min=1), totals[1].clamp(min=1)
        kl = self.kl_estimate(totals[2], totals[0]) if self.name == "kto" else None
        sums = {k: torch.zeros((), dtype=torch.float64, device=device) for k in self.sums}
        for i, batch in enumerate(group):
            sync = i == len(group) - 1
            with nullcontext() if sync else accelerator.no_sync(model), accelerator.autocast():
                terms, batch_sums = self.batch_sums(model, batch, "train", kl)
                loss = terms["pair_loss"] / pairs.to(terms["pair_loss"].dtype)
                if "nll" in terms:
                    loss = loss + self.nll_weight * terms["nll"] / chosen_tokens.to(loss.dtype)
                # DDP averages gradients over processes; multiply back to get a plain sum.
                loss = loss * accelerator.num_processes
                if penalty is not None and sync:
                    loss = loss + penalty(peft_model)
                accelerator.backward(loss)
            for k, v in batch_sums.items():
                sums[k] += v
        if kl is not None and accelerator.is_main_process:
            sums["kl"] += kl  # the step's estimate, already global: counted once
            sums["kl_steps"] += 1
        return sums


# --------------------------------------------------------------------------- the reference


@torch.no_grad()
def reference_table(
    objective: Objective,
    peft_model: Any,
    examples: Any,
    batch_size: int,
    pad_id: int,
    accelerator: Any,
    adapter: bool,
) -> torch.Tensor:
    """[examples, 2] reference log-probabilities: (chosen, rejected) of each pair, or (answer,
    mismatched answer) of each KTO example. `adapter`: the reference is the model as it is
    (a starting adapter, before any update); otherwise its adapter is disabled (the base).
    Each process scores every N-th example; one all-reduce assembles the table."""
    from peftcli.data.preference import collate_pairs

    n = len(examples)
    table = torch.zeros(n, 2, dtype=torch.float64, device=accelerator.device)
    mine = list(range(accelerator.process_index, n, accelerator.num_processes))
    was_training = peft_model.training
    peft_model.eval()
    try:
        with nullcontext() if adapter else peft_model.disable_adapter():
            for start in range(0, len(mine), batch_size):
                index = mine[start : start + batch_size]
                batch = collate_pairs([examples[i] for i in index], pad_id)
                batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                with accelerator.autocast():
                    logps, _ = sequence_logps(peft_model, batch)
                    if objective.paired:
                        values = torch.stack(logps.chunk(2), dim=1)
                    else:
                        values = torch.stack([logps, sequence_logps(peft_model, batch, "kl_")[0]], dim=1)
                table[torch.tensor(index, device=table.device)] = values.double()
    finally:
        peft_model.train(was_training)
    if accelerator.num_processes > 1:
        table = accelerator.reduce(table, "sum")  # every row is filled by exactly one process
    return table.cpu()


def load_or_compute_reference(
    objective: Objective,
    peft_model: Any,
    data: Any,
    batch_size: int,
    pad_id: int,
    accelerator: Any,
    adapter: bool,
    saved: Path | None,
    must_exist: bool = False,
) -> dict[str, torch.Tensor]:
    """The reference of the train (and eval) split: read from `saved` when it exists (a resumed
    run: the policy has moved on since), else computed, and written there by the main process."""
    from safetensors.torch import load_file, save_file

    from peftcli.outputs import follow_umask

    if saved is not None and saved.is_file():
        tables = load_file(saved)
        if len(tables["train"]) == len(data.train.examples):
            return tables
    if must_exist:
        raise RuntimeError(f"the reference log-probabilities of this run are missing ({saved})")
    tables = {
        "train": reference_table(
            objective, peft_model, data.train.examples, batch_size, pad_id, accelerator, adapter
        )
    }
    if data.eval is not None:
        tables["eval"] = reference_table(
            objective, peft_model, data.eval.examples, batch_size, pad_id, accelerator, adapter
        )
    if saved is not None and accelerator.is_main_process:
        save_file(tables, saved)
        follow_umask(saved)  # safetensors writes its files 0600
    return tables


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(
    model: Any,
    examples: Any,
    objective: Objective,
    accelerator: Any,
    batch_size: int,
    pad_id: int,
    split: str = "eval",
) -> dict[str, float]:
    """The objective's metrics over a whole split (sums over every pair, not means of batches)."""
    from torch.utils.data import DataLoader

    from peftcli.data.preference import collate_pairs
    from peftcli.training.loop import Shard

    loader = accelerator.prepare(
        DataLoader(examples, batch_size=batch_size, collate_fn=partial(collate_pairs, pad_id=pad_id))
    )
    was_training = model.training
    model.eval()
    sums = {k: torch.zeros((), dtype=torch.float64, device=accelerator.device) for k in objective.sums}
    kl_total = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    shard = Shard.of(len(examples), batch_size, accelerator)
    batches = []
    for k, batch in enumerate(loader):
        # Accelerate evens out the last round of batches with repeats; they count nothing.
        batch = shard.mask_repeats(batch, k) if shard else batch
        if not objective.paired:
            kl_total += objective.kl_sums(model, batch, split)
        batches.append(batch)
    kl = None
    if not objective.paired:
        pairs = sum(b["pair_mask"].sum() for b in batches).double()
        total = (
            accelerator.reduce(torch.stack([kl_total, pairs]), "sum")
            if accelerator.num_processes > 1
            else torch.stack([kl_total, pairs])
        )
        kl = objective.kl_estimate(total[0], total[1])
    for batch in batches:
        with accelerator.autocast():
            _, batch_sums = objective.batch_sums(model, batch, split, kl)
        for k, v in batch_sums.items():
            sums[k] += v
    model.train(was_training)
    stacked = torch.stack([sums[k] for k in objective.sums])
    if accelerator.num_processes > 1:
        stacked = accelerator.reduce(stacked, "sum")
    totals = dict(zip(objective.sums, stacked.tolist(), strict=True))
    metrics = objective.metrics(totals)
    if kl is not None:
        metrics["kl"] = float(kl)
    return metrics
