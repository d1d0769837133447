"""`peftcli data`: how a recipe's data is formatted, tokenised, masked and packed.

Prepares the data exactly as `peftcli train` does (same cache), then reports its statistics and
the first training rows: what the model reads, and which tokens carry loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftcli.data.images import ImageTokens
from peftcli.tasks import TASKS
from peftcli.training.losses import IGNORE

MARK = ("«", "»")  # around supervised text when stdout is not a terminal
COLOR = ("\x1b[1;32m", "\x1b[0m")  # on a terminal


@dataclass
class Report:
    stats: dict[str, Any]
    examples: list[dict[str, str]]  # {"text", "target"}
    segments: list[list[tuple[str, bool]]] = field(default_factory=list)  # (text, supervised) runs
    names: list[str] = field(default_factory=list)  # what each shown sequence is
    batching: str = ""
    cache: str = ""

    def as_json(self) -> dict[str, Any]:
        return {"stats": self.stats, "examples": self.examples}


def run_data(recipe_path: Path, overrides: list[str] | None, preview: int) -> Report:
    from peftcli.console import quiet_libraries
    from peftcli.data import padding_fraction, prepare
    from peftcli.model.load import load_tokenizer
    from peftcli.recipe_file import load_recipe

    recipe = load_recipe(recipe_path, overrides)
    quiet_libraries()
    tokenizer = load_tokenizer(recipe.model)
    task, training = recipe.model.task, recipe.training
    prepared = prepare(recipe.data, tokenizer, training.seed, task, training.objective)
    s = prepared.stats
    lengths = prepared.train.lengths()
    grouped = recipe.data.group_by_length
    stats = {
        "format": prepared.format,
        "rows": s["rows"],
        "examples": s["examples"],
        "sequences": s["sequences"],
        "tokens": s["tokens"],
        "supervised_tokens": s["supervised_tokens"],
        "padding_fraction": round(padding_fraction(lengths, training.batch_size, training.seed, grouped), 4),
        "truncated": s["truncated"],
        "dropped": s["dropped"],
        "longest": int(lengths.max()),
        "eval_examples": len(prepared.eval.examples) if prepared.eval else 0,
    }
    image = ImageTokens.of(tokenizer.processor) if TASKS[task].vision else None
    if image is not None:
        files = prepared.train.examples.images if hasattr(prepared.train.examples, "images") else None
        stats["images"] = sum(len(f) for f in files or [])
        counts = {image.count([e]) for e in image.expansions([f for row in files or [] for f in row])}
        spread = sorted({min(counts), max(counts)}) if counts else [0]
        stats["tokens_per_image"] = image.fixed or "-".join(map(str, spread))
    report = Report(stats, [])
    for i, example in enumerate(prepared.train.examples[:preview], 1):
        for answer, sequence in _sequences(example):
            _show(report, i, answer, sequence, tokenizer, task, prepared.labels, image)
    report.batching = f"batches of {training.batch_size}, " + (
        "grouped by length" if grouped else "shuffled (data.group_by_length: false)"
    )
    report.cache = f"{prepared.cache_dir}" + (" (loaded)" if prepared.from_cache else " (written now)")
    return report


def _sequences(example: dict[str, Any]) -> list[tuple[str | None, dict[str, Any]]]:
    """The sequences an example is trained on: itself, a pair's chosen and rejected answers,
    or a KTO answer (named by whether it is desirable)."""
    if "chosen" in example:
        return [("chosen", example["chosen"]), ("rejected", example["rejected"])]
    if "answer" in example:
        return [("desirable" if example["desirable"] else "undesirable", example["answer"])]
    return [(None, example)]


def _show(
    report: Report,
    i: int,
    answer: str | None,
    example: dict[str, Any],
    tokenizer: Any,
    task: str,
    labels: Any,
    image: ImageTokens | None,
) -> None:
    runs = _segments(example, tokenizer, task, labels)
    if image is not None and example.get("images"):  # each image's tokens as one marker, with its file
        runs = _mark_images(runs, image, example["images"])
    report.segments.append(runs)
    report.names.append(f"example {i}" + (f", {answer}" if answer else ""))
    shown = {
        "text": _decode(tokenizer, example["input_ids"]),
        "target": _target(example, tokenizer, task, labels),
    }
    report.examples.append({**shown, "answer": answer} if answer else shown)


def _mark_images(
    runs: list[tuple[str, bool]], image: ImageTokens, files: list[str]
) -> list[tuple[str, bool]]:
    """The runs with each image's text (its tokens, Idefics3's tile marks too) as one marker."""
    pending = list(zip(image.expansions(files), files, strict=True))
    out = []
    for text, supervised in runs:
        while pending and pending[0][0] in text:
            expansion, file = pending.pop(0)
            text = text.replace(expansion, f"[{image.count([expansion])} × {image.token}: {file}]", 1)
        out.append((text, supervised))
    return out


def _decode(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _target(example: dict[str, Any], tokenizer: Any, task: str, labels: list[str] | None) -> str:
    """The decoded tokens that carry loss (the class name, for classification)."""
    if task == "seq_cls":
        return labels[example["labels"]] if labels else str(example["labels"])
    if task == "seq2seq_lm":
        return _decode(tokenizer, [t for t in example["labels"] if t != IGNORE])
    ids, targets = example["input_ids"], example["labels"]
    return _decode(tokenizer, [t for t, y in zip(ids, targets, strict=True) if y != IGNORE])


def _segments(
    example: dict[str, Any], tokenizer: Any, task: str, labels: list[str] | None
) -> list[tuple[str, bool]]:
    """The input as runs of (text, carries loss); a packed row's examples end with a newline."""
    if not TASKS[task].next_token:
        return [
            (_decode(tokenizer, example["input_ids"]), False),
            (" → ", False),
            (_target(example, tokenizer, task, labels), True),
        ]
    ids, targets = example["input_ids"], example["labels"]
    starts = {i for i, p in enumerate(example.get("position_ids", [])) if p == 0 and i}
    runs: list[tuple[str, bool]] = []
    chunk: list[int] = []
    current = False
    for i, (t, y) in enumerate(zip(ids, targets, strict=True)):
        supervised = y != IGNORE
        if chunk and (supervised != current or i in starts):
            runs.append((_decode(tokenizer, chunk), current))
            chunk = []
        if i in starts:
            runs.append(("\n⏎ next packed example\n", False))
        chunk.append(t)
        current = supervised
    if chunk:
        runs.append((_decode(tokenizer, chunk), current))
    return runs


def _sequences_note(stats: dict[str, Any]) -> str:
    if stats["format"] == "preference":
        return " (a chosen and a rejected answer per pair)"
    return " (packed)" if stats["sequences"] != stats["examples"] else ""


def format_report(report: Report, color: bool = False) -> str:
    s = report.stats
    share = s["supervised_tokens"] / max(s["tokens"], 1)
    rows = [
        ("format", s["format"]),
        ("rows", f"{s['rows']:,}"),
        (
            "examples",
            f"{s['examples']:,}"
            + (f" ({s['dropped']} dropped: no supervised token left)" if s["dropped"] else ""),
        ),
        ("sequences", f"{s['sequences']:,}" + _sequences_note(s)),
        ("tokens", f"{s['tokens']:,}"),
        ("supervised tokens", f"{s['supervised_tokens']:,} ({100 * share:.1f}%)"),
        ("padding", f"{100 * s['padding_fraction']:.1f}% of batch positions ({report.batching})"),
        ("truncated", f"{s['truncated']:,}"),
        ("longest", f"{s['longest']:,} tokens"),
        *(
            [("images", f"{s['images']:,} ({s['tokens_per_image']} tokens each, none carries loss)")]
            if "images" in s
            else []
        ),
        ("eval examples", f"{s['eval_examples']:,}"),
        ("cache", report.cache),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    open_, close = COLOR if color else MARK
    for name, runs in zip(report.names, report.segments, strict=True):
        lines += ["", f"{name} ({'supervised text in colour' if color else 'supervised text in «»'}):"]
        text = "".join(f"{open_}{t}{close}" if sup else t for t, sup in runs)
        lines += ["  " + line for line in text.rstrip("\n").split("\n")]
    return "\n".join(lines)
