"""Summed token losses, shared by training and evaluation.

Losses are returned as sums with their token counts so that callers can normalise over any
set of tokens — a global batch across processes, or a whole eval split.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

IGNORE = -100


def _targets(logits: torch.Tensor, labels: torch.Tensor, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels as [batch, positions, classes] and [batch, positions]."""
    if task == "seq_cls":  # one "position" per example
        return logits[:, None], labels[:, None]
    # Prompt-learning methods prepend virtual tokens: keep the positions of real tokens.
    logits = logits[:, -labels.shape[1] :]
    if task == "causal_lm":  # position t predicts token t+1
        return logits[:, :-1], labels[:, 1:]
    return logits, labels


def supervised_tokens(batch: dict[str, torch.Tensor], task: str) -> torch.Tensor:
    """Tokens that carry loss (examples, for classification)."""
    labels = batch["labels"]
    if task == "causal_lm":
        labels = labels[:, 1:]
    return (labels != IGNORE).sum()


MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


def forward(model: Any, batch: dict[str, torch.Tensor], task: str) -> torch.Tensor:
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    if task != "seq_cls":
        # No KV cache in training/eval passes: it is wasted memory, and with one present
        # transformers does not derive the packed-sequence mask from position ids.
        inputs["use_cache"] = False
    if task == "seq2seq_lm":  # the model shifts labels into decoder inputs
        inputs["labels"] = batch["labels"]
    return model(**inputs).logits


def example_losses(
    logits: torch.Tensor, labels: torch.Tensor, task: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy and supervised-token count, per example."""
    logits, labels = _targets(logits, labels, task)
    losses = F.cross_entropy(
        logits.float().transpose(1, 2), labels, ignore_index=IGNORE, reduction="none"
    )  # [batch, positions]; 0 where ignored
    return losses.sum(dim=1), (labels != IGNORE).sum(dim=1)


def loss_sum(model: Any, batch: dict[str, torch.Tensor], task: str) -> torch.Tensor:
    logits, labels = _targets(forward(model, batch, task), batch["labels"], task)
    return F.cross_entropy(
        logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum"
    )
