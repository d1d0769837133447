"""Batching: examples → padded tensors (`collate`; preference pairs and KTO answers:
`collate_pairs`), the training order that groups examples of similar length
(`LengthGroupedSampler`), with the padding either order leaves, and which rows of a process's
batches are repeats (`Shard`)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from peftcli.tasks import IGNORE

if TYPE_CHECKING:
    import numpy as np

    from peftcli.data.splits import Prepared


# On a GPU every new sequence length re-plans the attention kernels (cuDNN: ~8 ms of host time a
# call on an H200, ../shared/measurements), so padded batches are rounded up to a multiple of this,
# never past data.max_length. The padding is masked (attention mask, ignored labels), so the
# loss per token is unchanged (tested). On a CPU nothing is re-planned and padding costs compute:
# batches are padded to their longest example only.
GPU_PAD_MULTIPLE = 64


def pad_multiple(device: Any) -> int:
    """The multiple padded lengths are rounded up to on `device`: 64 on CUDA, else 1."""
    import torch

    return GPU_PAD_MULTIPLE if torch.device(device).type == "cuda" else 1


def padded_length(longest: int, multiple: int = 1, limit: int | None = None) -> int:
    """`longest` rounded up to `multiple`, but not past `limit` (nor below `longest`)."""
    rounded = -(-longest // multiple) * multiple
    return max(longest, min(rounded, limit)) if limit is not None else rounded


def collator(data: Prepared, device: Any, collate_fn: Any) -> Any:
    """The training DataLoader's collate function on `device`: `collate_fn` (an objective's
    `collate`: `collate` or `collate_pairs` with its pad id) with lengths bucketed by
    `pad_multiple` within `data.max_length`."""
    from functools import partial

    return partial(collate_fn, multiple=pad_multiple(device), limit=data.max_length)


def collate(
    examples: list[dict[str, Any]],
    pad_id: int,
    multiple: int = 1,
    limit: int | None = None,
    processor: Any = None,
) -> dict[str, Any]:
    """Pad to the longest example in the batch (right padding), rounded up to `multiple` within
    `limit`; labels are padded on their own, so decoder targets (seq2seq) may differ in length from
    the inputs. Image+text examples: their images are read now, by `processor`, into one
    `pixel_values` (and the processor's other image inputs) in the order their image tokens stand
    in the batch."""
    import torch

    longest = padded_length(max(len(e["input_ids"]) for e in examples), multiple, limit)
    ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for row, e in enumerate(examples):
        ids[row, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
        mask[row, : len(e["input_ids"])] = 1
    # Tokens per row, so rows that carry no example (see Shard) can be left out of counts.
    row_tokens = mask.sum(dim=1)
    batch = {
        "input_ids": ids,
        "attention_mask": mask,
        "row_tokens": row_tokens,
        "num_tokens": row_tokens.sum(),
    }
    files = [f for e in examples for f in e.get("images", ())]
    if files:
        from peftcli.data.images import image_inputs

        batch.update(image_inputs(processor, files))
    if "position_ids" in examples[0]:
        # Packed rows: the mask comes from the position ids (see `pack`); the padding tail
        # counts up from 0 too, making it a segment of its own that nothing attends across.
        positions = torch.arange(longest).repeat(len(examples), 1)
        for row, e in enumerate(examples):
            positions[row, : len(e["position_ids"])] = torch.tensor(e["position_ids"])
            positions[row, len(e["position_ids"]) :] -= len(e["position_ids"])
        batch["position_ids"] = positions
        del batch["attention_mask"]
    if isinstance(examples[0]["labels"], int):  # classification
        batch["labels"] = torch.tensor([e["labels"] for e in examples])
        return batch
    # A causal LM's labels are as long as its inputs and stay so; seq2seq targets are bucketed alike.
    target = padded_length(max(len(e["labels"]) for e in examples), multiple, limit)
    labels = torch.full((len(examples), target), IGNORE, dtype=torch.long)
    for row, e in enumerate(examples):
        labels[row, : len(e["labels"])] = torch.tensor(e["labels"])
    batch["labels"] = labels
    return batch


def collate_pairs(
    examples: list[dict[str, Any]], pad_id: int, multiple: int = 1, limit: int | None = None
) -> dict[str, Any]:
    """Chosen sequences then rejected ones, padded together into one batch of 2B rows (one
    forward pass scores both), with each pair's index into the split and a pair mask; lengths
    bucketed as `collate` buckets them."""
    from functools import partial

    import torch

    pad = partial(collate, pad_id=pad_id, multiple=multiple, limit=limit)
    if "chosen" in examples[0]:
        batch = pad([e["chosen"] for e in examples] + [e["rejected"] for e in examples])
    else:
        batch = pad([e["answer"] for e in examples])
        kl = pad([e["kl"] for e in examples])
        batch.update({f"kl_{k}": kl[k] for k in ("input_ids", "attention_mask", "labels")})
        batch["desirable"] = torch.tensor([e["desirable"] for e in examples])
    batch["index"] = torch.tensor([e["index"] for e in examples])
    batch["pair_mask"] = torch.ones(len(examples), dtype=torch.long)
    return batch


class LengthGroupedSampler:
    """Example order that puts examples of similar length in the same batch, so padding to
    the longest wastes little: a seeded shuffle, sorted by length within mega-batches of
    `mega × batch_size`, cut into batches whose order is shuffled again (the batch holding the
    longest example first, so a too-large batch fails at step 1). A new order every epoch."""

    def __init__(self, lengths: np.ndarray, batch_size: int, seed: int, mega: int = 50):
        self.lengths, self.batch_size, self.seed, self.mega = lengths, batch_size, seed, mega
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        return iter(self.order().tolist())

    def order(self) -> np.ndarray:
        import numpy as np

        rng = np.random.default_rng(self.seed + self.epoch)
        n, size = len(self.lengths), self.batch_size
        shuffled = rng.permutation(n)
        batches = []
        for start in range(0, n, self.mega * size):
            chunk = shuffled[start : start + self.mega * size]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            batches += [chunk[i : i + size] for i in range(0, len(chunk), size)]
        # Only the last batch can be short; it stays last so the loader's batches align with ours.
        full, short = [b for b in batches if len(b) == size], [b for b in batches if len(b) < size]
        full = [full[i] for i in rng.permutation(len(full))]
        if full:
            longest = max(range(len(full)), key=lambda i: self.lengths[full[i]].max())
            full.insert(0, full.pop(longest))
        return np.concatenate(full + short) if batches else np.zeros(0, dtype=np.int64)


def train_sampler(data: Prepared, batch_size: int, seed: int) -> LengthGroupedSampler | None:
    """The training DataLoader's sampler: length-grouped with `data.group_by_length`, else None
    (a plain shuffle, which Accelerate seeds)."""
    if not data.group_by_length:
        return None
    return LengthGroupedSampler(data.train.lengths(), batch_size, seed)


def padding_fraction(lengths: np.ndarray, batch_size: int, seed: int, grouped: bool) -> float:
    """Share of the padded batch positions that are padding, for one epoch in the order training
    uses: the length-grouped order, or the seeded shuffle Accelerate draws (torch.randperm)."""
    import numpy as np

    n = len(lengths)
    if n == 0:
        return 0.0
    if grouped:
        order = LengthGroupedSampler(lengths, batch_size, seed).order()
    else:
        import torch

        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    ordered = np.asarray(lengths)[order]
    starts = np.arange(0, n, batch_size)
    sizes = np.diff(np.append(starts, n))
    padded = int((np.maximum.reduceat(ordered, starts) * sizes).sum())
    return 1.0 - int(ordered.sum()) / padded


@dataclass
class Shard:
    """Which rows of a process's micro-batches are real examples.

    Accelerate deals the epoch's batches round-robin (batch k of process p is global batch
    k·N + p) and, so that every process steps together, completes the last round with examples
    from the start of the epoch. In that global order the first `examples` slots are the epoch;
    every slot after them is a repeat. Repeats keep their place in the forward and backward
    pass (every process must take part in each gradient all-reduce) but carry no loss and no
    tokens, so an uneven last global batch makes the same update as on one process."""

    examples: int
    batch_size: int
    process: int
    processes: int

    @classmethod
    def of(cls, examples: int, batch_size: int, accelerator: Any) -> Shard | None:
        """The shard of this process, or None on one process (nothing is repeated there)."""
        if accelerator.num_processes == 1:
            return None
        return cls(examples, batch_size, accelerator.process_index, accelerator.num_processes)

    def mask_repeats(self, batch: dict[str, Any], index: int) -> dict[str, Any]:
        import torch

        first = (index * self.processes + self.process) * self.batch_size
        if "pair_mask" in batch:  # preference batches: one mask entry per pair (or KTO answer)
            rows = batch["pair_mask"].shape[0]
        else:
            rows = batch["input_ids"].shape[0]
        if first + rows <= self.examples:
            return batch
        repeat = torch.arange(first, first + rows, device=batch["input_ids"].device) >= self.examples
        if "labels" not in batch and "pair_mask" not in batch:  # prompts (GRPO): sampled, counted as nothing
            return {**batch, "repeat": repeat}
        if "pair_mask" in batch:
            sequences = repeat.repeat(batch["row_tokens"].shape[0] // rows)  # chosen rows, then rejected
            tokens = batch["row_tokens"].masked_fill(sequences, 0)
            mask = batch["pair_mask"].masked_fill(repeat, 0)
            return {**batch, "pair_mask": mask, "row_tokens": tokens, "num_tokens": tokens.sum()}
        labels = batch["labels"].clone()
        labels[repeat] = IGNORE
        tokens = batch["row_tokens"].masked_fill(repeat, 0)
        return {**batch, "labels": labels, "row_tokens": tokens, "num_tokens": tokens.sum()}
