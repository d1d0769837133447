"""GRPO's loss equals TRL's GRPOTrainer's, in value and gradients, for each loss_type both have.

TRL's own `_compute_loss` runs on the same batch (completions, their log-probabilities under
the policy, the sampling policy and the reference, advantages); only the model forward is
replaced by the shared log-probabilities, so both sides differentiate the same function.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from peftcli.objectives.grpo import grpo_token_loss, normalised

trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")

N, T, V, MAX_NEW = 6, 5, 7, 5


def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(N, T, dtype=torch.long)
    mask[1, 3:] = 0  # completions of different lengths: the loss types normalise differently
    mask[4, 1:] = 0
    return {
        "logits": torch.randn(N, T, V, generator=g, dtype=torch.float64),
        "ids": torch.randint(0, V, (N, T), generator=g),
        "mask": mask,
        # Off the current policy by up to ±0.5 nats, so some ratios leave [1-ε, 1+ε] and clip.
        "old_shift": (torch.rand(N, T, generator=g, dtype=torch.float64) - 0.5),
        "ref_shift": torch.randn(N, T, generator=g, dtype=torch.float64) * 0.3,
        "advantages": torch.randn(N, generator=g, dtype=torch.float64),
    }


def logps_of(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.gather(logits.log_softmax(-1), 2, ids.unsqueeze(-1)).squeeze(-1)


def trl_loss(b: dict, logits: torch.Tensor, loss_type: str, beta: float, epsilon: float) -> torch.Tensor:
    logps = logps_of(logits, b["ids"])
    accelerator = SimpleNamespace(
        num_processes=1,
        sync_gradients=True,
        reduce=lambda x, reduction="sum": x,
        gather=lambda x: x,
        gather_for_metrics=lambda x: x,
    )
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        aux_loss_enabled=False,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        beta=beta,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None),
        loss_type=loss_type,
        epsilon_low=epsilon,
        epsilon_high=epsilon,
        use_vllm=False,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        max_completion_length=MAX_NEW,
        accelerator=accelerator,
        _entropy_bonus_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
    )
    trainer.args.steps_per_generation = 1
    inputs = {
        "prompt_ids": torch.zeros(N, 0, dtype=torch.long),
        "prompt_mask": torch.zeros(N, 0, dtype=torch.long),
        "completion_ids": b["ids"],
        "completion_mask": b["mask"],
        "advantages": b["advantages"],
        "old_per_token_logps": (logps + b["old_shift"]).detach(),
        "ref_per_token_logps": (logps + b["ref_shift"]).detach(),
        "num_items_in_batch": b["mask"].sum().double(),
    }
    return trl_grpo.GRPOTrainer._compute_loss(trainer, None, inputs)


def ours(b: dict, logits: torch.Tensor, loss_type: str, beta: float, epsilon: float) -> torch.Tensor:
    logps = logps_of(logits, b["ids"])
    per_token, _, _ = grpo_token_loss(
        logps,
        (logps + b["old_shift"]).detach(),
        (logps + b["ref_shift"]).detach(),
        b["advantages"],
        beta,
        epsilon,
    )
    totals = {"completions": torch.tensor(float(N)), "tokens": b["mask"].sum().double()}
    return normalised(per_token, b["mask"].double(), loss_type, totals, MAX_NEW)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_loss_and_gradients_equal_trl(loss_type: str, beta: float) -> None:
    b = batch()
    grads, losses = [], []
    for fn in (trl_loss, ours):
        logits = b["logits"].clone().requires_grad_(True)
        loss = fn(b, logits, loss_type, beta, 0.2)
        loss.backward()
        losses.append(loss.detach())
        grads.append(logits.grad)
    # float64, and both sides compute the same terms; only the order of a few dozen summed terms
    # may differ (one rounding each, ~1e-16 relative), so 1e-12 leaves three orders of margin.
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=1e-12)
    assert grads[0].abs().sum() > 0


def test_some_ratios_clip() -> None:
    """The batch exercises the clip: otherwise the comparison would not cover it."""
    b = batch()
    logps = logps_of(b["logits"], b["ids"])
    _, _, clipped = grpo_token_loss(logps, logps + b["old_shift"], None, b["advantages"], 0.0, 0.2)
    assert 0 < int((clipped * b["mask"]).sum()) < int(b["mask"].sum())
