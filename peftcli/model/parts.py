"""The parts of a vision-language model, by module name: the vision tower, the projector that maps
its features into the language model's embeddings, and the language model (everything else, the
output head included). A text-only model is all language model.

Names follow transformers' classes: LLaVA and its kin (`vision_tower`, `multi_modal_projector`),
Qwen2-VL (`visual`, with its `merger` the projector), Idefics3/SmolVLM (`vision_model`,
`connector`), Gemma 3 (`vision_tower`, `multi_modal_projector`)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

VISION, PROJECTOR, LANGUAGE = "vision tower", "projector", "language model"
PARTS = (VISION, PROJECTOR, LANGUAGE)
PROJECTOR_NAMES = ("multi_modal_projector", "mm_projector", "connector", "merger")
VISION_NAMES = ("vision_tower", "vision_model", "visual", "vision_encoder")


def part_of(name: str) -> str:
    """The part a module or parameter belongs to, from its dotted name."""
    segments = name.split(".")
    if any(s in PROJECTOR_NAMES for s in segments):
        return PROJECTOR
    if any(s in VISION_NAMES for s in segments):
        return VISION
    return LANGUAGE


def part_modules(model: Any, part: str) -> list[str]:
    """The outermost modules of `part` (e.g. ['model.multi_modal_projector'])."""
    names = PROJECTOR_NAMES if part == PROJECTOR else VISION_NAMES
    found = [n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in names]
    return [n for n in found if not any(n.startswith(o + ".") for o in found if o != n)]


def parameter_counts(named: Iterable[tuple[str, Any]]) -> dict[str, dict[str, int]]:
    """Per part: its parameters and the trainable ones (exact counts; PEFT's wrapper names and
    adapter weights are counted in the part they sit in)."""
    counts = {p: {"params": 0, "trainable": 0} for p in PARTS}
    for name, param in named:
        part = counts[part_of(name)]
        part["params"] += param.numel()
        part["trainable"] += param.numel() if param.requires_grad else 0
    return counts


def is_vision_language(config: Any) -> bool:
    return getattr(config, "vision_config", None) is not None


def part_lines(counts: dict[str, dict[str, int]], notes: dict[str, str]) -> list[str]:
    """`validate` and `estimate`: each part's parameters, and what training does to it."""
    total = sum(c["params"] for c in counts.values())
    width = max(len(p) for p in PARTS)
    rows = [f"parts of a vision-language model ({total:,} parameters):"]
    for part in PARTS:
        c = counts[part]
        trainable = f", {c['trainable']:,} trainable" if c.get("trainable") else ""
        rows.append(f"  {part:<{width}}  {c['params']:>12,} parameters{trainable}: {notes[part]}")
    return rows


def part_notes(
    method: str, adapted: dict[str, int], train_projector: bool, train_vision: bool
) -> dict[str, str]:
    """What training does to each part: `adapted` counts the modules the method targets in each."""
    return {
        VISION: f"{method} on {adapted.get(VISION, 0)} modules" if train_vision else "frozen",
        PROJECTOR: "trained in full" if train_projector else "frozen",
        LANGUAGE: f"{method} on {adapted.get(LANGUAGE, 0)} modules",
    }
