"""Evaluation: loss and perplexity over a split, exact match from greedy generation."""

from __future__ import annotations

import math
from functools import partial
from typing import TYPE_CHECKING, Any

import torch

from peftcli.data.batching import collate
from peftcli.data.images import image_inputs
from peftcli.data.splits import Reference, Split
from peftcli.methods.generation import generate
from peftcli.training.losses import example_losses, forward

if TYPE_CHECKING:
    from peftcli.recipe import EvalSection


@torch.no_grad()
def loss_metrics(
    model: Any, split: Split, task: str, accelerator: Any, batch_size: int, pad_id: int, processor: Any = None
) -> dict[str, float]:
    """Mean loss per supervised token over the whole split (not a mean of batch means);
    perplexity for language models, accuracy and macro-F1 for classification. `processor` reads
    the images of image+text examples."""
    from torch.utils.data import DataLoader

    collate_fn = partial(collate, pad_id=pad_id, processor=processor)
    loader = accelerator.prepare(DataLoader(split.examples, batch_size=batch_size, collate_fn=collate_fn))
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.long)
    predictions, truths = [], []
    for batch in loader:
        with accelerator.autocast():
            logits = forward(model, batch, task)
        losses, counts = example_losses(logits, batch["labels"], task)
        # gather_for_metrics drops the samples Accelerate duplicated to even out the shards.
        losses, counts = accelerator.gather_for_metrics((losses.detach(), counts))
        total += losses.double().sum().cpu()
        count += counts.sum().cpu()
        if task == "seq_cls":
            pred, truth = accelerator.gather_for_metrics((logits.argmax(-1), batch["labels"]))
            predictions.append(pred.cpu())
            truths.append(truth.cpu())
    model.train(was_training)
    loss = (total / count.clamp(min=1)).item()
    if task == "seq_cls":
        return {"loss": loss, **classification_scores(torch.cat(predictions), torch.cat(truths))}
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def classification_scores(pred: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    """Accuracy and macro-F1 over the classes that occur in the truth or the predictions."""
    f1s = []
    for c in torch.unique(torch.cat([pred, truth])):
        tp = ((pred == c) & (truth == c)).sum().item()
        fp = ((pred == c) & (truth != c)).sum().item()
        fn = ((pred != c) & (truth == c)).sum().item()
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return {"accuracy": (pred == truth).float().mean().item(), "f1": sum(f1s) / len(f1s)}


@torch.no_grad()
def generate_answers(
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    max_new_tokens: int,
    batch_size: int = 32,
    images: list[list[str]] | None = None,
) -> list[str]:
    """Greedy continuations of token-id prompts, batched with left padding; `images`: each
    prompt's image files (read by the tokenizer's processor)."""
    device = next(p for p in model.parameters()).device
    pad = tokenizer.pad_token_id
    was_training = model.training
    model.eval()
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        longest = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (longest - len(p)) + p for p in chunk], device=device)
        mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in chunk], device=device)
        files = [f for row in (images or [])[start : start + batch_size] for f in row]
        extra = image_inputs(tokenizer.processor, files, device) if files else {}
        out = generate(model, ids, mask, max_new_tokens, pad, model_inputs=extra)
        # Decoder-only models return prompt + continuation; encoder-decoders the decoder only.
        new = out if getattr(model.config, "is_encoder_decoder", False) else out[:, longest:]
        answers += tokenizer.batch_decode(new, skip_special_tokens=True)
    model.train(was_training)
    return answers


def exact_match(
    model: Any, tokenizer: Any, references: list[Reference], max_new_tokens: int
) -> dict[str, Any]:
    prompts, images = [r.prompt_ids for r in references], [r.images for r in references]
    answers = generate_answers(model, tokenizer, prompts, max_new_tokens, images=images)
    hits = [a.strip() == r.answer.strip() for a, r in zip(answers, references, strict=True)]
    samples = [
        {
            "prompt": tokenizer.decode(r.prompt_ids, skip_special_tokens=True),
            "reference": r.answer,
            "output": a,
            **({"images": r.images} if r.images else {}),  # the decoded prompt does not show them
        }
        for r, a in zip(references[:5], answers[:5], strict=True)
    ]
    return {"exact_match": sum(hits) / len(hits), "samples": samples}


def evaluate(
    model: Any,
    tokenizer: Any,
    split: Split,
    section: EvalSection,
    task: str,
    accelerator: Any,
    batch_size: int,
    with_exact_match: bool | None = None,
) -> dict[str, Any]:
    """The metrics `section.metrics` asks for (null: the task's default), where they apply to the
    task (exact_match also when `with_exact_match`; classification always reports accuracy and
    F1). The recipe refuses metrics a task does not compute (tasks.TASKS)."""
    from peftcli.tasks import TASKS

    wanted = set(section.metrics or TASKS[task].default_metrics)
    processor = getattr(tokenizer, "processor", None)
    measured = loss_metrics(model, split, task, accelerator, batch_size, tokenizer.pad_token_id, processor)
    keep = wanted | ({"accuracy", "f1"} if task == "seq_cls" else set())
    metrics: dict[str, Any] = {k: v for k, v in measured.items() if k in keep}
    want_em = with_exact_match if with_exact_match is not None else "exact_match" in wanted
    if want_em and split.references and task != "seq_cls":
        unwrapped = accelerator.unwrap_model(model)
        result = exact_match(unwrapped, tokenizer, split.references, section.max_new_tokens)
        metrics["exact_match"] = result["exact_match"]
        metrics["samples"] = result["samples"]
    metrics["examples"] = len(split.examples)
    return metrics
