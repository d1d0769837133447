"""KTO: unpaired answers labelled desirable or not, against the reference and a batch estimate
of the KL term (the mean log-ratio of mismatched answers: each prompt with another row's
answer, scored without gradients)."""

from __future__ import annotations

from typing import Any

import torch

from peftcli.objectives.preference import Batch, Preference, Scores, sequence_logps


class KTO(Preference):
    def losses(
        self, s: Scores, desirable: torch.Tensor, kl: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, reward) per answer."""
        p = self.section
        ratio = s.chosen - s.ref_chosen
        up = p.desirable_weight * (1 - torch.sigmoid(p.beta * (ratio - kl)))
        down = p.undesirable_weight * (1 - torch.sigmoid(p.beta * (kl - ratio)))
        return torch.where(desirable, up, down), p.beta * ratio.detach()

    def reference_scores(self, model: Any, batch: Batch) -> torch.Tensor:
        return torch.stack([sequence_logps(model, batch)[0], sequence_logps(model, batch, "kl_")[0]], dim=1)

    def kl_sum(self, model: Any, batch: Batch, split: str) -> torch.Tensor:
        """Σ (log π − log π_ref) over the batch's mismatched answers (no gradient)."""
        with torch.no_grad():
            logps, _ = sequence_logps(model, batch, "kl_")
        ref = self.reference_of(batch, split)[:, 1]
        mask = batch["pair_mask"].to(logps.dtype)
        return ((logps - ref) * mask).sum().double()

    def kl_estimate(self, totals: torch.Tensor) -> torch.Tensor:
        return (totals[2] / totals[0].clamp(min=1)).clamp(min=0)

    def batch_sums(
        self, model: Any, batch: Batch, split: str, kl: torch.Tensor | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        logps, tokens = sequence_logps(model, batch)
        ref = self.reference_of(batch, split)
        s = Scores(logps, None, tokens, None, None if ref is None else ref[:, 0])
        mask = batch["pair_mask"].to(s.chosen.dtype)
        desirable = batch["desirable"].to(s.chosen.device)
        loss, reward = self.losses(
            s, desirable, kl if kl is not None else torch.zeros((), device=s.chosen.device)
        )
        up, down = desirable.to(mask.dtype) * mask, (~desirable).to(mask.dtype) * mask
        out = {
            "pairs": mask.sum(),
            "rewards_chosen": (reward * up).sum(),
            "rewards_rejected": (reward * down).sum(),
            "reward_correct": (((reward > 0) == desirable) * mask).sum(),
            "desirable": up.sum(),
            "undesirable": down.sum(),
            "logps_chosen": (s.chosen.detach() * up).sum(),
            "logps_rejected": (s.chosen.detach() * down).sum(),
            "pair_loss": (loss * mask).sum(),
        }
        return {"pair_loss": out["pair_loss"]}, {k: v.detach().double() for k, v in out.items()}

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        pairs = max(sums.get("pairs", 0.0), 1.0)
        up, down = max(sums["desirable"], 1.0), max(sums["undesirable"], 1.0)
        chosen, rejected = sums["rewards_chosen"] / up, sums["rewards_rejected"] / down
        out = {
            "loss": self.loss_of(sums),
            "reward_accuracy": sums["reward_correct"] / pairs,
            "reward_margin": chosen - rejected,
            "rewards_chosen": chosen,
            "rewards_rejected": rejected,
            "logps_chosen": sums["logps_chosen"] / up,
            "logps_rejected": sums["logps_rejected"] / down,
        }
        if sums.get("kl_steps"):
            out["kl"] = sums["kl"] / sums["kl_steps"]
        return out
