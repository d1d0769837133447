"""The objectives on pairs, one class each: DPO (with its loss variants, one row each), ORPO,
SimPO. A pair's chosen and rejected answers go through one forward pass, chosen rows first."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from peftcli.objectives.preference import Batch, Preference, Scores, sequence_logps


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x < 0, without cancellation on either side of −ln 2."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def smoothed(logits: torch.Tensor, epsilon: float) -> torch.Tensor:
    """−(1−ε)·log σ(x) − ε·log σ(−x): the sigmoid loss with labels flipped at rate ε."""
    return -(1 - epsilon) * F.logsigmoid(logits) - epsilon * F.logsigmoid(-logits)


class Paired(Preference):
    """Scores of pairs; a subclass gives the per-pair loss and rewards (`losses`)."""

    @property
    def nll_weight(self) -> float:  # type: ignore[override]
        """DPO + sft_weight is RPO; SimPO + sft_weight is CPO's behaviour-cloning term."""
        return self.section.sft_weight

    def losses(self, s: Scores) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, chosen reward, rejected reward) per pair."""
        raise NotImplementedError

    def score(self, model: Any, batch: Batch, split: str) -> Scores:
        logps, tokens = sequence_logps(model, batch)
        ref = self.reference_of(batch, split)
        c, r = logps.chunk(2)
        tc, tr = tokens.chunk(2)
        if ref is None:
            return Scores(c, r, tc, tr)
        return Scores(c, r, tc, tr, ref[:, 0], ref[:, 1])

    def reference_scores(self, model: Any, batch: Batch) -> torch.Tensor:
        return torch.stack(sequence_logps(model, batch)[0].chunk(2), dim=1)

    def batch_sums(
        self, model: Any, batch: Batch, split: str, kl: torch.Tensor | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        s = self.score(model, batch, split)
        mask = batch["pair_mask"].to(s.chosen.dtype)
        loss, reward_c, reward_r = self.losses(s)
        out: dict[str, torch.Tensor] = {
            "pairs": mask.sum(),
            "rewards_chosen": (reward_c * mask).sum(),
            "rewards_rejected": (reward_r * mask).sum(),
            "reward_correct": ((reward_c > reward_r) * mask).sum(),
            "logps_chosen": (s.chosen.detach() * mask).sum(),
            "logps_rejected": (s.rejected.detach() * mask).sum(),
            "preferred": ((s.chosen > s.rejected) * mask).sum(),
        }
        if self.nll_weight:
            out["nll"] = -(s.chosen * mask).sum()
            out["chosen_tokens"] = (s.chosen_tokens * mask).sum()
        out["pair_loss"] = (loss * mask).sum()
        terms = {k: out[k] for k in ("pair_loss", "nll") if k in out}
        return terms, {k: v.detach().double() for k, v in out.items()}

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        pairs = max(sums.get("pairs", 0.0), 1.0)
        chosen, rejected = sums["rewards_chosen"] / pairs, sums["rewards_rejected"] / pairs
        return {
            "loss": self.loss_of(sums),
            "preference_accuracy": sums["preferred"] / pairs,
            "reward_accuracy": sums["reward_correct"] / pairs,
            "reward_margin": chosen - rejected,
            "rewards_chosen": chosen,
            "rewards_rejected": rejected,
            "logps_chosen": sums["logps_chosen"] / pairs,
            "logps_rejected": sums["logps_rejected"] / pairs,
        }


def _sigmoid(
    chosen: torch.Tensor, rejected: torch.Tensor, s: Scores, beta: float, eps: float
) -> torch.Tensor:
    return smoothed(beta * (chosen - rejected), eps)  # with label_smoothing: conservative DPO


def _hinge(chosen: torch.Tensor, rejected: torch.Tensor, s: Scores, beta: float, eps: float) -> torch.Tensor:
    return torch.relu(1 - beta * (chosen - rejected))  # SLiC


def _ipo(chosen: torch.Tensor, rejected: torch.Tensor, s: Scores, beta: float, eps: float) -> torch.Tensor:
    # per-token log-ratios (TRL, confirmed with IPO's authors)
    gap = chosen / s.chosen_tokens.clamp(min=1) - rejected / s.rejected_tokens.clamp(min=1)
    return (gap - 1 / (2 * beta)) ** 2


def _robust(chosen: torch.Tensor, rejected: torch.Tensor, s: Scores, beta: float, eps: float) -> torch.Tensor:
    delta = chosen - rejected
    return (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)


# preference.loss_type → the loss of a pair's log-ratios (policy − reference) of its two answers.
DPO_LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "sigmoid": _sigmoid,
    "ipo": _ipo,
    "hinge": _hinge,
    "robust": _robust,
}


class DPO(Paired):
    def losses(self, s: Scores) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        beta = self.section.beta
        chosen_ratio, rejected_ratio = s.chosen - s.ref_chosen, s.rejected - s.ref_rejected
        loss = DPO_LOSSES[self.section.loss_type](
            chosen_ratio, rejected_ratio, s, beta, self.section.label_smoothing
        )
        return loss, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def _means(s: Scores) -> tuple[torch.Tensor, torch.Tensor]:
    """Each answer's mean log-probability per token."""
    return s.chosen / s.chosen_tokens.clamp(min=1), s.rejected / s.rejected_tokens.clamp(min=1)


class SimPO(Paired):
    def losses(self, s: Scores) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        p = self.section
        mean_c, mean_r = _means(s)
        loss = smoothed(p.beta * (mean_c - mean_r - p.gamma / p.beta), p.label_smoothing)
        return loss, p.beta * mean_c.detach(), p.beta * mean_r.detach()


class ORPO(Paired):
    @property
    def nll_weight(self) -> float:  # type: ignore[override]
        return 1.0  # ORPO's own SFT term on the chosen answers

    def losses(self, s: Scores) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mean_c, mean_r = _means(s)
        log_odds = (mean_c - mean_r) - (log1mexp(mean_c) - log1mexp(mean_r))
        lam = self.section.orpo_lambda
        return -lam * F.logsigmoid(log_odds), lam * mean_c.detach(), lam * mean_r.detach()
