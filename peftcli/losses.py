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
    if task == "causal_lm":
        return _causal_loss_sum(model, batch)
    logits, labels = _targets(forward(model, batch, task), batch["labels"], task)
    return F.cross_entropy(
        logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum"
    )


def _causal_loss_sum(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The output head projects only the positions that predict a supervised token.

    Prompt and padding positions would get logits only to be ignored: with the frozen head
    that is most of its matmul and of the [tokens, vocabulary] float32 logits (and their
    gradient) in memory. A forward pre-hook on the output embeddings hands the head just those
    hidden states; a model whose head is not called that way gets full logits, masked here."""
    labels = batch["labels"][:, 1:]
    supervised = labels != IGNORE
    targets = labels[supervised]
    head = getattr(model, "module", model).get_output_embeddings()  # through DDP/DeepSpeed
    seen = {"calls": 0, "compacted": False}

    def keep_supervised(module: Any, args: tuple) -> tuple | None:
        seen["calls"] += 1
        hidden = args[0] if args else None
        if seen["calls"] > 1 or not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
            return None
        # Position t predicts token t+1; prompt-learning methods prepend virtual positions.
        keep = F.pad(supervised, (hidden.shape[1] - supervised.shape[1] - 1, 1))
        seen["compacted"] = True
        return (hidden[keep].unsqueeze(0), *args[1:])

    handle = head.register_forward_pre_hook(keep_supervised) if head is not None else None
    try:
        logits = forward(model, batch, "causal_lm")
    finally:
        if handle is not None:
            handle.remove()
    if seen["compacted"] and seen["calls"] > 1:
        raise RuntimeError("the output head ran more than once in one forward pass")
    if not seen["compacted"]:  # full logits: keep the supervised positions
        logits = _targets(logits, batch["labels"], "causal_lm")[0][supervised]
    return F.cross_entropy(logits.flatten(0, -2).float(), targets, reduction="sum")
