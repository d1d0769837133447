"""Packing: several examples per row, up to max_length tokens, so little of a batch is padding."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from peftcli.data.splits import TokenArrays, Writer


def pack_plan(lengths: Sequence[int], max_length: int, seed: int) -> list[list[int]]:
    """Which examples share each row: first fit over a seeded shuffle, in O(n log n).

    A max-tree over the rows' free space finds the first row an example fits in; unused
    leaves hold a whole free row, so the first fit is a new row when no open row has room."""
    n = len(lengths)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    size = 1
    while size < max(n, 1):
        size *= 2
    free = [0] * size + [max_length] * size
    for node in range(size - 1, 0, -1):
        free[node] = max(free[2 * node], free[2 * node + 1])
    rows: list[list[int]] = []
    for i in order:
        need = int(lengths[i])
        if need > free[1]:  # longer than max_length: a row of its own
            node, need = size + len(rows), free[size + len(rows)]
        else:
            node = 1
            while node < size:
                node = 2 * node if free[2 * node] >= need else 2 * node + 1
        if node - size == len(rows):
            rows.append([])
        rows[node - size].append(i)
        free[node] -= need
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return rows


def pack(examples: Sequence[dict[str, Any]], max_length: int, seed: int) -> list[dict[str, Any]]:
    """Several examples per row, up to max_length tokens (see `pack_plan`).

    Position ids restart at every example; with no attention mask, transformers derives a
    block-diagonal causal mask from them, so attention never crosses examples."""
    plan = pack_plan([len(e["input_ids"]) for e in examples], max_length, seed)
    return [_packed_row([examples[i] for i in row]) for row in plan]


def _packed_row(examples: list[dict[str, Any]]) -> dict[str, Any]:
    row: dict[str, Any] = {"input_ids": [], "labels": [], "position_ids": []}
    for e in examples:
        row["input_ids"] += e["input_ids"]
        row["labels"] += e["labels"]
        row["position_ids"] += range(len(e["input_ids"]))
    return row


def pack_split(folder: Path, max_length: int, seed: int) -> int:
    """Pack the train split on disk (streaming from its memory map); returns the row count."""
    source = TokenArrays(folder, "train", classes=False)
    writer = Writer(folder, "packed", positions=True)
    for row in pack_plan(source.lengths(), max_length, seed):
        writer.add(_packed_row([source[i] for i in row]))
    writer.close()
    del source
    for path in folder.glob("train.*"):
        path.unlink()
    for path in folder.glob("packed.*"):
        path.rename(folder / ("train" + path.name.removeprefix("packed")))
    return writer.count
