"""Data stage: rows from files (or the hub) → token ids with labels, from `recipe.data`.

Labels follow the Hugging Face convention (aligned with `input_ids`, -100 = no loss); the
training loop shifts them for causal models. Each format renders a row into token ids plus a
mask of the tokens that carry loss; `train_on: all` supervises every token.
"""

from __future__ import annotations

import csv
import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UserError

if TYPE_CHECKING:
    from .recipe import DataSection

IGNORE = -100
EXTENSIONS = {
    ".jsonl": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
    ".txt": "text",
}
# Columns each format needs, in detection order.
FORMAT_COLUMNS = {
    "messages": ("messages",),
    "completion": ("prompt", "completion"),
    "classification": ("text", "label"),
    "text": ("text",),
}
TASK_FORMATS = {  # in the order `auto` tries them
    "causal_lm": ("messages", "completion", "text"),
    "seq2seq_lm": ("completion",),
    "seq_cls": ("classification",),
}


@dataclass
class Reference:
    """A prompt to generate from and the answer to compare with (exact_match)."""

    prompt_ids: list[int]
    answer: str


@dataclass
class Split:
    examples: list[dict[str, list[int]]]
    references: list[Reference] = field(default_factory=list)


@dataclass
class Prepared:
    format: str
    train: Split
    eval: Split | None
    stats: dict[str, int] = field(default_factory=dict)
    labels: list[str] | None = None  # class names, seq_cls only


# --------------------------------------------------------------------------- reading


Rows = list[tuple[str, dict[str, Any]]]  # (where: "file:line", row)


def read_rows(spec: str, key: str = "data.train") -> Rows:
    """Rows of a local file or folder, or of a hub dataset, each with its location.

    JSON Lines, JSON, CSV/TSV and text are read here so that a bad row is reported by file and
    line; Parquet and hub datasets go through `datasets`.
    """
    path = Path(spec).expanduser()
    if is_hub_dataset(spec):
        rows = _read_hub(spec, key)
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in EXTENSIONS)
        if not files:
            raise UserError(f"{key}: folder {path} holds no {', '.join(EXTENSIONS)} files")
        rows = [r for f in files for r in _read_file(f, key)]
    elif path.is_file():
        rows = _read_file(path, key)
    else:
        raise UserError(f"{key}: file not found: {spec}")
    if not rows:
        raise UserError(f"{key}: {spec} has no rows")
    return rows


def is_hub_dataset(spec: str) -> bool:
    """`org/name` (optionally `:split`) that is not a local path."""
    path = Path(spec).expanduser()
    return not path.exists() and not spec.startswith((".", "/", "~")) and path.suffix not in EXTENSIONS


def _read_file(path: Path, key: str) -> Rows:
    kind = EXTENSIONS.get(path.suffix)
    if kind is None:
        raise UserError(f"{key}: {path} has an unknown extension; use one of {', '.join(EXTENSIONS)}")
    name = path.name
    try:
        text = path.read_text(encoding="utf-8") if kind != "parquet" else ""
    except UnicodeDecodeError as exc:
        raise UserError(f"{key}: {path} is not UTF-8 text (byte {exc.start})") from None
    rows: Rows = []
    if kind == "jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                rows.append((f"{name}:{n}", _json_object(line, f"{path}:{n}", key)))
    elif kind == "json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            if exc.msg == "Extra data":  # JSON Lines saved as .json
                return [
                    (f"{name}:{n}", _json_object(line, f"{path}:{n}", key))
                    for n, line in enumerate(text.splitlines(), 1)
                    if line.strip()
                ]
            raise UserError(f"{key}: {path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
        if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
            data = next(iter(data.values()))  # {"data": [...]}
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise UserError(f"{key}: {path} must hold a list of objects (or use .jsonl, one object per line)")
        rows = [(f"{name}[{i}]", r) for i, r in enumerate(data)]
    elif kind in ("csv", "tsv"):
        reader = csv.DictReader(io.StringIO(text), delimiter="," if kind == "csv" else "\t")
        for row in reader:
            if None in row or None in row.values():
                raise UserError(
                    f"{key}: {path}:{reader.line_num}: the row does not have the header's columns"
                )
            rows.append((f"{name}:{reader.line_num}", dict(row)))
    elif kind == "text":
        rows = [
            (f"{name}:{n}", {"text": line}) for n, line in enumerate(text.splitlines(), 1) if line.strip()
        ]
    else:
        import datasets

        datasets.disable_progress_bars()
        try:
            table = datasets.load_dataset("parquet", data_files=str(path), split="train")
        except Exception as exc:  # pyarrow raises many types
            raise UserError(f"{key}: cannot read {path}: {_first_line(exc)}") from None
        rows = [(f"{name} row {i + 1}", r) for i, r in enumerate(table.to_list())]
    return rows


def _json_object(line: str, where: str, key: str) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UserError(f"{key}: {where}: invalid JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(row, dict):
        raise UserError(f"{key}: {where}: expected a JSON object, got {type(row).__name__}")
    return row


def _read_hub(spec: str, key: str) -> Rows:
    import datasets

    datasets.disable_progress_bars()
    name, _, split = spec.partition(":")  # "org/name:split"
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as exc:  # datasets raises many types for a missing or unreachable dataset
        raise UserError(
            f"{key}: cannot load hub dataset `{name}`: {_first_line(exc)}", "offline, use a local file"
        ) from None
    return [(f"{name} row {i + 1}", r) for i, r in enumerate(ds.to_list())]


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def detect_format(rows: Rows, wanted: str, key: str = "data.format", task: str = "causal_lm") -> str:
    columns = set(rows[0][1])
    if wanted == "auto":
        for fmt in TASK_FORMATS[task]:
            if set(FORMAT_COLUMNS[fmt]) <= columns:
                return fmt
        expected = " or ".join("+".join(FORMAT_COLUMNS[f]) for f in TASK_FORMATS[task])
        raise UserError(
            f"{key}: cannot tell the format from the columns {sorted(columns)}; expected {expected}"
        )
    if wanted not in TASK_FORMATS[task]:
        raise UserError(
            f"{key}: {wanted} does not fit model.task: {task}; use {' or '.join(TASK_FORMATS[task])}"
        )
    missing = [c for c in FORMAT_COLUMNS[wanted] if c not in columns]
    if missing:
        raise UserError(f"{key}: {wanted} needs column `{missing[0]}`; the data has {sorted(columns)}")
    return wanted


# --------------------------------------------------------------------------- encoding


class Encoder:
    """Turns rows of one format into training examples for one tokenizer and task.

    causal_lm: `{"input_ids", "labels"}` of equal length (-100 = no loss);
    seq2seq_lm: `{"input_ids"}` (encoder) and `{"labels"}` (decoder targets);
    seq_cls: `{"input_ids", "labels": class id}`.
    """

    def __init__(
        self,
        tokenizer: Any,
        fmt: str,
        section: DataSection,
        task: str = "causal_lm",
        label_names: list[str] | None = None,
    ):
        self.tok = tokenizer
        self.fmt = fmt
        self.section = section
        self.task = task
        self.label_ids = {name: i for i, name in enumerate(label_names or [])}
        # The special tokens the tokenizer wraps around text (e.g. BOS); EOS is added by us.
        plain = tokenizer("x", add_special_tokens=False)["input_ids"]
        full = tokenizer("x")["input_ids"]
        start = full.index(plain[0]) if plain and plain[0] in full else 0
        self.prefix = [t for t in full[:start] if t != tokenizer.eos_token_id]
        if fmt == "messages" and not tokenizer.chat_template:
            raise UserError(
                "data.format: messages needs a chat template, and this tokenizer has none",
                "use a chat model or the completion format",
            )

    def _text(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def example(self, row: dict[str, Any], where: str, stats: dict[str, int]) -> dict[str, Any] | None:
        """The training example of a row, truncated to max_length; None (and counted as
        dropped) when truncation leaves nothing to learn from."""
        stats["examples"] += 1
        max_len = self.section.max_length
        if self.task == "seq_cls":
            ids = self.tok(_field(row, "text", where))["input_ids"]
            if len(ids) > max_len:
                ids, stats["truncated"] = ids[: max_len - 1] + ids[-1:], stats["truncated"] + 1
            stats["tokens"] += len(ids)
            stats["supervised_tokens"] += 1
            return {"input_ids": ids, "labels": self.label_id(row, where)}
        if self.task == "seq2seq_lm":
            source = self.tok(_field(row, "prompt", where))["input_ids"]
            target = self._text(_field(row, "completion", where)) + [self.tok.eos_token_id]
            if len(source) > max_len or len(target) > max_len:
                stats["truncated"] += 1
                source, target = source[:max_len], target[:max_len]
            stats["tokens"] += len(source) + len(target)
            stats["supervised_tokens"] += len(target)
            return {"input_ids": source, "labels": target}
        ids, mask = self.encode(row, where)
        if len(ids) > max_len:
            ids, mask = ids[:max_len], mask[:max_len]
            stats["truncated"] += 1
        supervised = sum(mask[1:])  # position 0 is never predicted, so it cannot carry loss
        if supervised == 0:
            stats["dropped"] += 1
            return None
        labels = [t if m else IGNORE for t, m in zip(ids, mask, strict=True)]
        labels[0] = IGNORE
        stats["tokens"] += len(ids)
        stats["supervised_tokens"] += supervised
        return {"input_ids": ids, "labels": labels}

    def label_id(self, row: dict[str, Any], where: str) -> int:
        label = row.get("label")
        if str(label) not in self.label_ids:
            known = ", ".join(self.label_ids)
            raise UserError(f"{where}: label {label!r} is not one of the training labels ({known})")
        return self.label_ids[str(label)]

    def encode(self, row: dict[str, Any], where: str) -> tuple[list[int], list[bool]]:
        """Causal LM: token ids and which of them carry loss."""
        everything = self.section.train_on == "all"
        if self.fmt == "text":
            ids = self.prefix + self._text(_field(row, "text", where)) + [self.tok.eos_token_id]
            return ids, [True] * len(ids)
        if self.fmt == "completion":
            prompt = self.prefix + self._text(_field(row, "prompt", where))
            answer = self._text(_field(row, "completion", where)) + [self.tok.eos_token_id]
            return prompt + answer, [everything] * len(prompt) + [True] * len(answer)
        return self._encode_messages(_messages(row, where), where, everything)

    def _render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _encode_messages(
        self, messages: list[dict[str, str]], where: str, everything: bool
    ) -> tuple[list[int], list[bool]]:
        text = self._render(messages, False)
        spans = []  # character spans of assistant answers, end-of-turn token included
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before, through = self._render(messages[:i], True), self._render(messages[: i + 1], False)
            if not (text.startswith(before) and text.startswith(through)):
                raise UserError(
                    f"{where}: the chat template does not render conversations incrementally, "
                    "so answers cannot be located; use train_on: all"
                )
            spans.append((len(before), len(through.rstrip())))
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        mask = [everything or any(s <= a and b <= e for s, e in spans) for a, b in enc["offset_mapping"]]
        return enc["input_ids"], mask

    def reference(self, row: dict[str, Any], where: str) -> Reference | None:
        """The prompt to generate from and the expected answer, where the row has one."""
        if self.fmt == "completion":
            prompt = _field(row, "prompt", where)
            ids = (
                self.tok(prompt)["input_ids"]
                if self.task == "seq2seq_lm"
                else self.prefix + self._text(prompt)
            )
            return Reference(ids, str(row["completion"]))
        if self.fmt == "messages":
            messages = _messages(row, where)
            if messages[-1]["role"] == "assistant":
                prompt = self._render(messages[:-1], True)
                return Reference(self._text(prompt), messages[-1]["content"])
        return None


def _field(row: dict[str, Any], name: str, where: str) -> str:
    value = row.get(name)
    if not isinstance(value, str):
        problem = "is missing" if name not in row else f"must be a string, not {type(value).__name__}"
        raise UserError(f"{where}: `{name}` {problem}")
    return value


def _messages(row: dict[str, Any], where: str) -> list[dict[str, str]]:
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: `messages` must be a non-empty list of {{role, content}}")
    for m in messages:
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("content"), str)
            or m.get("role") not in ("system", "user", "assistant", "tool")
        ):
            raise UserError(
                f"{where}: each message needs a role (system/user/assistant/tool) and string content"
            )
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def check_rows(rows: Rows, fmt: str) -> None:
    """Every row has the fields its format needs, with the right types (no tokenizer needed)."""
    for where, row in rows:
        if fmt == "messages":
            _messages(row, where)
        elif fmt == "classification":
            _field(row, "text", where)
            if not isinstance(row.get("label"), str | int | bool):
                raise UserError(f"{where}: `label` must be a string or an integer")
        else:
            for name in FORMAT_COLUMNS[fmt]:
                _field(row, name, where)


def label_names(rows: Rows) -> list[str]:
    """Class names in a stable order: integers by value (0..max), strings sorted."""
    labels = {row.get("label") for _, row in rows}
    if all(isinstance(x, int) and not isinstance(x, bool) for x in labels):
        return [str(i) for i in range(max(labels) + 1)]
    return sorted(str(x) for x in labels)


def encode_rows(rows: Rows, encoder: Encoder, stats: dict[str, int], with_references: bool = False) -> Split:
    split = Split([])
    for where, row in rows:
        example = encoder.example(row, where, stats)
        if example is None:
            continue
        split.examples.append(example)
        if with_references and (ref := encoder.reference(row, where)) is not None:
            split.references.append(ref)
    return split


def new_stats() -> dict[str, int]:
    return dict.fromkeys(("examples", "tokens", "supervised_tokens", "truncated", "dropped"), 0)


def prepare(section: DataSection, tokenizer: Any, seed: int, task: str = "causal_lm") -> Prepared:
    rows = read_rows(section.train)
    fmt = detect_format(rows, section.format, task=task)
    check_rows(rows, fmt)
    labels = label_names(rows) if task == "seq_cls" else None
    if isinstance(section.eval, str):
        eval_rows = read_rows(section.eval, "data.eval")
        check_rows(eval_rows, detect_format(eval_rows, fmt, "data.eval", task))
    elif section.eval:
        order = list(range(len(rows)))
        random.Random(seed).shuffle(order)
        n_eval = max(1, round(section.eval * len(rows)))
        if n_eval >= len(rows):
            raise UserError(
                f"data.eval: holding out {section.eval} of {len(rows)} rows leaves nothing to train on"
            )
        held = set(order[:n_eval])
        eval_rows = [rows[i] for i in sorted(held)]
        rows = [r for i, r in enumerate(rows) if i not in held]
    else:
        eval_rows = []
    encoder = Encoder(tokenizer, fmt, section, task, labels)
    stats = new_stats()
    train = encode_rows(rows, encoder, stats)
    if not train.examples:
        raise UserError(
            f"data.train: no example has a supervised token within max_length={section.max_length}"
        )
    if section.packing:
        train.examples = pack(train.examples, section.max_length, seed)
        stats["rows"] = len(train.examples)
    eval_split = encode_rows(eval_rows, encoder, new_stats(), with_references=True) if eval_rows else None
    return Prepared(fmt, train, eval_split, stats, labels)


def pack(examples: list[dict[str, Any]], max_length: int, seed: int) -> list[dict[str, Any]]:
    """Several examples per row, up to max_length tokens (first fit over a seeded shuffle).

    Position ids restart at every example; with no attention mask, transformers derives a
    block-diagonal causal mask from them, so attention never crosses examples."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    rows: list[dict[str, Any]] = []
    for i in order:
        e = examples[i]
        n = len(e["input_ids"])
        row = next((r for r in rows if len(r["input_ids"]) + n <= max_length), None)
        if row is None:
            row = {"input_ids": [], "labels": [], "position_ids": []}
            rows.append(row)
        row["input_ids"] += e["input_ids"]
        row["labels"] += e["labels"]
        row["position_ids"] += list(range(n))
    return rows


def prepare_file(
    path: str, section: DataSection, tokenizer: Any, task: str = "causal_lm", labels: list[str] | None = None
) -> Split:
    """A whole file as one evaluation split, with reference answers where the format has them."""
    rows = read_rows(path, "--data")
    fmt = detect_format(rows, section.format, "--data", task)
    check_rows(rows, fmt)
    return encode_rows(
        rows, Encoder(tokenizer, fmt, section, task, labels), new_stats(), with_references=True
    )


# --------------------------------------------------------------------------- batching


def collate(examples: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Pad to the longest example in the batch (right padding); labels are padded on their
    own, so decoder targets (seq2seq) may differ in length from the inputs."""
    import torch

    longest = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for row, e in enumerate(examples):
        ids[row, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
        mask[row, : len(e["input_ids"])] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "num_tokens": mask.sum()}
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
    target = max(len(e["labels"]) for e in examples)
    labels = torch.full((len(examples), target), IGNORE, dtype=torch.long)
    for row, e in enumerate(examples):
        labels[row, : len(e["labels"])] = torch.tensor(e["labels"])
    batch["labels"] = labels
    return batch
