"""What preparation produces: splits of examples, held in memory or memory-mapped from the
flat token files of a cache entry (`Writer` writes them, `TokenArrays` reads them)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np


@dataclass
class Reference:
    """A prompt to generate from and the answer to compare with (exact_match)."""

    prompt_ids: list[int]
    answer: str
    images: list[str] = field(default_factory=list)  # the prompt's image files, in order


@dataclass
class Split:
    examples: Sequence[dict[str, Any]]  # a list, or `TokenArrays` memory-mapped from the cache
    references: list[Reference] = field(default_factory=list)

    def lengths(self) -> np.ndarray:
        """Input length of every example."""
        import numpy as np

        if hasattr(self.examples, "lengths"):  # token files, pairs
            return self.examples.lengths()
        return np.array([len(e["input_ids"]) for e in self.examples], dtype=np.int64)


@dataclass
class Prepared:
    format: str
    train: Split
    eval: Split | None
    stats: dict[str, int] = field(default_factory=dict)
    labels: list[str] | None = None  # class names, seq_cls only
    group_by_length: bool = False
    cache_dir: Path | None = None
    max_length: int | None = None  # no sequence is longer: the bound for bucketed padding
    from_cache: bool = False


class Writer:
    """Appends one split's examples to flat files: int32 tokens and int64 offsets.

    `<split>.input_ids` + `<split>.input_offsets`, `<split>.labels` + `<split>.label_offsets`
    (a class id is a label of length 1), `<split>.position_ids` for packed rows, and
    `<split>.images.jsonl` (each example's image files, one JSON list a line) for image data."""

    def __init__(self, folder: Path, name: str, positions: bool = False, images: bool = False):
        parts = ["input_ids", "input_offsets", "labels", "label_offsets"] + (
            ["position_ids"] if positions else []
        )
        self.files = {p: open(folder / f"{name}.{p}.bin", "wb") for p in parts}
        self.n_inputs = self.n_labels = self.count = 0
        for p in ("input_offsets", "label_offsets"):
            self.files[p].write(_int64([0]))
        if images:
            self.files["images"] = open(folder / f"{name}.images.jsonl", "w", encoding="utf-8")

    def add(self, example: dict[str, Any]) -> None:
        ids, labels = example["input_ids"], example["labels"]
        labels = [labels] if isinstance(labels, int) else labels
        self.n_inputs += len(ids)
        self.n_labels += len(labels)
        self.count += 1
        self.files["input_ids"].write(_int32(ids))
        self.files["labels"].write(_int32(labels))
        self.files["input_offsets"].write(_int64([self.n_inputs]))
        self.files["label_offsets"].write(_int64([self.n_labels]))
        if "position_ids" in self.files:
            self.files["position_ids"].write(_int32(example["position_ids"]))
        if "images" in self.files:
            self.files["images"].write(json.dumps(example["images"]) + "\n")

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def _int32(values: list[int]) -> bytes:
    from array import array

    return array("i", values).tobytes()


def _int64(values: list[int]) -> bytes:
    from array import array

    return array("q", values).tobytes()


def _map(path: Path, dtype: str) -> np.ndarray:
    import numpy as np

    if not path.is_file():
        return None  # type: ignore[return-value]
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


class Examples(Sequence):
    """A read-only sequence of examples built on `item(i)`: slices and negative indices as a
    list takes them."""

    def item(self, i: int) -> Any:
        raise NotImplementedError

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self.item(j) for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.item(i)


class TokenArrays(Examples):
    """A split's examples, memory-mapped from the cache; `examples[i]` is the same dict of
    token lists an in-memory split holds."""

    def __init__(self, folder: Path, name: str, classes: bool):
        self.classes = classes
        self.input_ids = _map(folder / f"{name}.input_ids.bin", "int32")
        self.input_offsets = _map(folder / f"{name}.input_offsets.bin", "int64")
        self.labels = _map(folder / f"{name}.labels.bin", "int32")
        self.label_offsets = _map(folder / f"{name}.label_offsets.bin", "int64")
        self.position_ids = _map(folder / f"{name}.position_ids.bin", "int32")
        images = folder / f"{name}.images.jsonl"  # paths only: small, read whole
        self.images = (
            [json.loads(line) for line in images.read_text(encoding="utf-8").splitlines()]
            if images.is_file()
            else None
        )

    def __len__(self) -> int:
        return len(self.input_offsets) - 1

    def item(self, i: int) -> Any:
        a, b = int(self.input_offsets[i]), int(self.input_offsets[i + 1])
        c, d = int(self.label_offsets[i]), int(self.label_offsets[i + 1])
        example = {
            "input_ids": self.input_ids[a:b].tolist(),
            "labels": int(self.labels[c]) if self.classes else self.labels[c:d].tolist(),
        }
        if self.position_ids is not None:
            example["position_ids"] = self.position_ids[a:b].tolist()
        if self.images is not None:
            example["images"] = self.images[i]
        return example

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]

    def lengths(self) -> np.ndarray:
        import numpy as np

        return np.diff(np.asarray(self.input_offsets))
