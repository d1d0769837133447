"""Summed token losses, shared by training and evaluation.

Losses are returned as sums with their token counts so that callers can normalise over any
set of tokens — a global batch across processes, or a whole eval split.
"""

from __future__ import annotations

import os
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from peftcli.tasks import IGNORE, TASKS


def at_least_float32(logits: torch.Tensor) -> torch.Tensor:
    """Logits in at least float32 for the softmax (half precision loses the small probabilities);
    a float64 model keeps float64."""
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def _targets(logits: torch.Tensor, labels: torch.Tensor, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels as [batch, positions, classes] and [batch, positions]."""
    if task == "seq_cls":  # one "position" per example
        return logits[:, None], labels[:, None]
    # Prompt-learning methods prepend virtual tokens: keep the positions of real tokens.
    logits = logits[:, -labels.shape[1] :]
    if TASKS[task].next_token:  # position t predicts token t+1
        return logits[:, :-1], labels[:, 1:]
    return logits, labels


def supervised_tokens(batch: dict[str, torch.Tensor], task: str) -> torch.Tensor:
    """Tokens that carry loss (examples, for classification)."""
    labels = batch["labels"]
    if TASKS[task].next_token:
        labels = labels[:, 1:]
    return (labels != IGNORE).sum()


# pixel_values: a vision-language batch's images, in the order their image tokens stand
# (pixel_attention_mask: Idefics3's padding of tiles to one size).
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "pixel_values", "pixel_attention_mask")


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
        at_least_float32(logits).transpose(1, 2), labels, ignore_index=IGNORE, reduction="none"
    )  # [batch, positions]; 0 where ignored
    return losses.sum(dim=1), (labels != IGNORE).sum(dim=1)


def loss_sum(model: Any, batch: dict[str, torch.Tensor], task: str) -> torch.Tensor:
    if TASKS[task].next_token:
        return _causal_loss_sum(model, batch)
    logits, labels = _targets(forward(model, batch, task), batch["labels"], task)
    return F.cross_entropy(
        at_least_float32(logits).flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum"
    )


# The fused head + cross-entropy makes its logits a chunk of rows at a time (`fused_rows`). A
# chunk takes a share of the memory free on the device: on a GPU large chunks mean few kernel
# launches (Llama 3's 128k vocabulary took 64 chunks of 128 rows for 8k positions at a fixed
# 2**24 logits); on a CPU, where a chunk of 2,048 rows already runs at the matmul's speed, each
# chunk's buffers are kept at most CPU_CHUNK_BYTES, so they stay below glibc's mmap threshold
# and are reused rather than returned and faulted in again.
GPU_CHUNK_SHARE = 8  # 1/8 of the free GPU memory
CPU_CHUNK_SHARE = 64  # 1/64 of the available RAM
CPU_CHUNK_BYTES = 32 * 2**20


def fused_rows(vocab: int, device: Any = None, free: int | None = None) -> int:
    """Rows of logits per chunk: the chunk's float32 logits and their activation-dtype copies
    (8 bytes per logit at most) within a share of the memory `free` on `device` (measured when
    not given)."""
    on_gpu = torch.device(device or "cpu").type == "cuda"
    if free is None:
        free = free_memory(device)
    budget = free // GPU_CHUNK_SHARE if on_gpu else min(free // CPU_CHUNK_SHARE, CPU_CHUNK_BYTES)
    return max(1, budget // (8 * max(vocab, 1)))


def free_memory(device: Any = None) -> int:
    """Bytes free on `device`: on a GPU the driver's count plus what PyTorch's allocator holds
    unused (no stream is synchronised), on a CPU the RAM the kernel says is available."""
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + cached
    try:
        with open("/proc/meminfo", encoding="ascii") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4 * 2**30  # unknown: assume a small machine


class LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T + bias` against `targets`, chunk by chunk.

    Each chunk's logits are made and, in place, turned into their exponentials (less the
    row's maximum) for the log-sum-exp, then — when gradients are wanted — into the softmax
    minus the one-hot, whose products with the weight (and the hidden states) are the
    gradients, kept for backward. So no
    [positions, vocabulary] tensor outlives its chunk: the float32 logits, log-probabilities
    and their gradient that a plain head + `F.cross_entropy` keep for a whole batch are gone,
    for the same matmul FLOPs. Under autocast the matmuls run in the autocast dtype, as the
    model's own head would; the softmax is float32."""

    @staticmethod
    def forward(ctx: Any, hidden, weight, bias, targets, rows):  # type: ignore[override]
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        wide = torch.promote_types(weight.dtype, torch.float32)  # the softmax's dtype
        total = torch.zeros((), dtype=wide, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=wide) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=wide) if need_b else None
        for start in range(0, hidden.shape[0], rows):
            h, t = hidden[start : start + rows], targets[start : start + rows]
            logits = F.linear(h, weight, bias).to(wide)
            # log-sum-exp and softmax in this one buffer (torch.logsumexp would take another)
            top = logits.amax(dim=-1, keepdim=True)
            picked = logits.gather(1, t[:, None])
            sums = logits.sub_(top).exp_().sum(dim=-1, keepdim=True)
            total += (top + sums.log() - picked).sum()
            if not (need_h or need_w or need_b):
                continue
            grad = logits.div_(sums)  # the softmax
            grad[torch.arange(len(t), device=t.device), t] -= 1
            if need_h:
                grad_h[start : start + rows] = grad.to(h.dtype) @ weight.to(h.dtype)
            if need_w:
                grad_w += grad.T @ h.to(wide)
            if need_b:
                grad_b += grad.sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        return total

    @staticmethod
    def backward(ctx: Any, grad_out):  # type: ignore[override]
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scaled = [None if g is None else (g * grad_out).to(g.dtype) for g in (grad_h, grad_w, grad_b)]
        return (*scaled, None, None)


def linear_cross_entropy(hidden, weight, bias, targets) -> torch.Tensor:
    return LinearCrossEntropy.apply(hidden, weight, bias, targets, fused_rows(weight.shape[0], hidden.device))


def fusable(head: Any) -> bool:
    """A plain linear head whose output the model returns untouched (known after one batch)."""
    return (
        type(head) is torch.nn.Linear
        and "forward" not in vars(head)  # no hook that replaced it (e.g. accelerate offload)
        and getattr(head, "_peftcli_plain_logits", True)
    )


def _compact(hidden: Any, supervised: torch.Tensor) -> torch.Tensor | None:
    """The hidden states at the positions that predict a supervised token, [S, hidden]; None for
    anything that is not a [batch, positions, hidden] tensor."""
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        return None
    # Position t predicts token t+1; prompt-learning methods prepend virtual positions.
    keep = F.pad(supervised, (hidden.shape[1] - supervised.shape[1] - 1, 1))
    return hidden[keep]


def _causal_loss_sum(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Only the positions that predict a supervised token reach the output head, fused with
    the cross-entropy.

    Prompt and padding positions would get logits only to be ignored: with the frozen head
    that is most of its matmul and of the [tokens, vocabulary] float32 logits (and their
    gradient) in memory. The head's input is cut down to the supervised positions; a plain
    linear head is replaced for the pass by `LinearCrossEntropy` (chunked, no full logits),
    returning an empty marker as the logits — if the model hands back anything else (a
    scale or soft cap applied to the logits) the batch is redone with real logits, and so
    is every later one. Other heads get the cut-down input; a model whose head is not called
    that way gets full logits, masked here."""
    labels = batch["labels"][:, 1:]
    supervised = labels != IGNORE
    targets = labels[supervised]
    head = getattr(model, "module", model).get_output_embeddings()  # through DDP/DeepSpeed

    compact = partial(_compact, supervised=supervised)

    if head is not None and fusable(head):
        fused: dict[str, Any] = {"calls": 0}

        def project(hidden: Any, *args: Any, **kwargs: Any) -> Any:
            fused["calls"] += 1
            kept = compact(hidden) if fused["calls"] == 1 and not args and not kwargs else None
            if kept is None:
                return torch.nn.Linear.forward(head, hidden, *args, **kwargs)
            fused["loss"] = linear_cross_entropy(kept, head.weight, head.bias, targets)
            fused["marker"] = hidden.new_empty((*kept.shape[:-1], 0), dtype=torch.float32)
            return fused["marker"]

        head.forward = project
        try:
            logits = forward(model, batch, "causal_lm")
        finally:
            del head.forward
        if fused["calls"] == 1 and "marker" in fused and logits is fused["marker"]:
            return fused["loss"]
        head._peftcli_plain_logits = False  # the model post-processes its logits

    logits, targets, _ = supervised_logits(model, batch)
    return F.cross_entropy(at_least_float32(logits), targets, reduction="sum")


def supervised_logits(
    model: Any, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A causal LM's logits at the positions that predict a supervised token only, [S, vocab],
    with those tokens [S] and the row each comes from [S].

    The head's input is cut down to those positions (a forward pre-hook), so prompt and padding
    positions never get logits; a model whose head is not called that way gets full logits,
    masked here."""
    labels = batch["labels"][:, 1:]
    supervised = labels != IGNORE
    targets = labels[supervised]
    rows = supervised.nonzero()[:, 0]
    head = getattr(model, "module", model).get_output_embeddings()  # through DDP/DeepSpeed

    compact = partial(_compact, supervised=supervised)

    seen = {"calls": 0, "compacted": False}

    def keep_supervised(module: Any, args: tuple) -> tuple | None:
        seen["calls"] += 1
        kept = compact(args[0]) if args and seen["calls"] == 1 else None
        if kept is None:
            return None
        seen["compacted"] = True
        return (kept.unsqueeze(0), *args[1:])

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
    return logits.flatten(0, -2), targets, rows
