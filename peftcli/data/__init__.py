"""Data stage: rows from files (or the hub) → token ids with labels, from `recipe.data`.

Labels follow the Hugging Face convention (aligned with `input_ids`, -100 = no loss); the
training loop shifts them for causal models. Each format renders a row into token ids plus a
mask of the tokens that carry loss; `train_on: all` supervises every token.

Preparation streams: rows are read one at a time, tokenised in batches and appended to flat
token files under `$PEFTCLI_HOME/cache/data/<key>/`, which training memory-maps. The key hashes
everything that changes the result (data bytes, tokenizer, format, settings), so a second run
with the same inputs skips preparation, and memory does not grow with the size of the data.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import shutil
import socket
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftcli.errors import UserError
from peftcli.tasks import TASKS

if TYPE_CHECKING:
    import numpy as np

    from peftcli.recipe import DataSection

IGNORE = -100
EXTENSIONS = {  # matched case-insensitively (train.JSONL, DATA.CSV)
    ".jsonl": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
    ".txt": "text",
}
# Columns each format needs (alpaca's `input` is optional).
FORMAT_COLUMNS = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "completion": ("prompt", "completion"),
    "classification": ("text", "label"),
    "text": ("text",),
}
CHAT_FORMATS = ("messages", "sharegpt")
MESSAGE_ROLES = ("system", "user", "assistant", "tool")
# ShareGPT's `from` values (several dialects) → chat-template roles.
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "function_call": "assistant",
    "tool": "tool",
    "function": "tool",
    "observation": "tool",
}
# The Stanford Alpaca prompt, with and without an input.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
CACHE_VERSION = 2  # bump when encoding changes, so old caches are not reused (2: labels by value)
BATCH_ROWS = 256  # rows per tokenizer call


@dataclass
class Reference:
    """A prompt to generate from and the answer to compare with (exact_match)."""

    prompt_ids: list[int]
    answer: str


@dataclass
class Split:
    examples: Sequence[dict[str, Any]]  # a list, or `TokenArrays` memory-mapped from the cache
    references: list[Reference] = field(default_factory=list)

    def lengths(self) -> np.ndarray:
        """Input length of every example."""
        import numpy as np

        if isinstance(self.examples, TokenArrays):
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
    from_cache: bool = False


def _say(message: str) -> None:
    """Progress on stderr, from the main process only (every process prepares the data)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"peftcli: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- reading


Row = tuple[str, dict[str, Any]]  # (where: "file:line", row)
Rows = list[Row]


def is_hub_dataset(spec: str) -> bool:
    """`org/name[@config][:split]` that is not a local path."""
    path = Path(spec).expanduser()
    return not path.exists() and not spec.startswith((".", "/", "~")) and _kind(path) is None


def _kind(path: Path) -> str | None:
    """The reader for a file, from its extension in any case; None when unknown."""
    return EXTENSIONS.get(path.suffix.lower())


def hub_spec(spec: str) -> tuple[str, str | None, str]:
    """`org/name@config:split` → (name, config, split); the split defaults to train."""
    base, _, split = spec.partition(":")
    name, _, config = base.partition("@")
    return name, config or None, split or "train"


class Source:
    """One `data.train` / `data.eval` value: a file, a folder of files, or a hub dataset."""

    def __init__(self, spec: str, key: str = "data.train"):
        self.spec, self.key = spec, key
        self.hub = is_hub_dataset(spec)
        self._dataset: Any = None
        self.files: list[Path] = []
        if self.hub:
            return
        path = Path(spec).expanduser()
        if path.is_dir():
            self.files = sorted(p for p in path.rglob("*") if _kind(p) is not None and p.is_file())
            if not self.files:
                raise UserError(f"{key}: folder {path} holds no {', '.join(EXTENSIONS)} files")
            self.root = path
        elif path.is_file():
            self.files, self.root = [path], path.parent
        else:
            raise UserError(f"{key}: file not found: {spec}")

    def rows(self) -> Iterator[Row]:
        if self.hub:
            ds, name = self.dataset(), hub_spec(self.spec)[0]
            n = 0
            for batch in ds.iter(batch_size=1000):
                columns = list(batch)
                for j in range(len(batch[columns[0]]) if columns else 0):
                    n += 1
                    yield f"{name} row {n}", {c: batch[c][j] for c in columns}
            return
        for path in self.files:
            yield from _file_rows(path, self.key)

    def first(self) -> Row:
        for row in self.rows():
            return row
        raise UserError(f"{self.key}: {self.spec} has no rows")

    def fingerprint(self) -> str:
        """Changes whenever the data does: the bytes of local files, the hub dataset's fingerprint."""
        if self.hub:
            return f"hub:{self.spec}:{self.dataset()._fingerprint}"
        digest = hashlib.sha256()
        for path in self.files:
            if len(self.files) > 1:
                digest.update(str(path.relative_to(self.root)).encode() + b"\0")
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
        return digest.hexdigest()

    def dataset(self) -> Any:
        if self._dataset is None:
            import datasets

            datasets.disable_progress_bars()
            name, config, split = hub_spec(self.spec)
            try:
                self._dataset = datasets.load_dataset(name, config, split=split)
            except Exception as exc:  # datasets raises many types for a missing or unreachable dataset
                raise UserError(
                    f"{self.key}: cannot load hub dataset `{self.spec}`: {_first_line(exc)}",
                    "hub ids are org/name, org/name:split or org/name@config:split; offline, use a local file",
                ) from None
        return self._dataset


def read_rows(spec: str, key: str = "data.train") -> Rows:
    """All rows of a local file or folder, or of a hub dataset, each with its location.

    Loads everything: for small files (tests, `eval --data`); preparation streams instead."""
    rows = list(Source(spec, key).rows())
    if not rows:
        raise UserError(f"{key}: {spec} has no rows")
    return rows


def _file_rows(path: Path, key: str) -> Iterator[Row]:
    """Rows of one file, streamed, each with its file:line, so a bad row is reported there.

    JSON Lines, CSV/TSV and text are read line by line; a .json array is parsed whole;
    Parquet goes through pyarrow in record batches."""
    kind = _kind(path)
    if kind is None:
        raise UserError(f"{key}: {path} has an unknown extension; use one of {', '.join(EXTENSIONS)}")
    name = path.name
    if kind in ("jsonl", "text"):
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
                except UnicodeDecodeError as exc:
                    raise UserError(f"{key}: {path}:{n}: not UTF-8 text (byte {exc.start})") from None
                if not line.strip():
                    continue
                if kind == "text":
                    yield f"{name}:{n}", {"text": line.rstrip("\r\n")}
                else:
                    yield f"{name}:{n}", _json_object(line, f"{path}:{n}", key)
    elif kind == "json":
        yield from _json_rows(path, key)
    elif kind in ("csv", "tsv"):
        try:
            with open(path, encoding="utf-8-sig", newline="") as f:
                reader = csv.DictReader(f, delimiter="," if kind == "csv" else "\t")
                _unique_columns(reader.fieldnames or [], path, key)
                for row in reader:
                    if None in row or None in row.values():
                        raise UserError(
                            f"{key}: {path}:{reader.line_num}: the row does not have the header's columns"
                        )
                    yield f"{name}:{reader.line_num}", dict(row)
        except UnicodeDecodeError as exc:
            raise UserError(f"{key}: {path} is not UTF-8 text (byte {exc.start})") from None
        except csv.Error as exc:
            raise UserError(f"{key}: {path}: {exc}") from None
    else:
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(path)
            _unique_columns(parquet.schema_arrow.names, path, key)
            batches = parquet.iter_batches(batch_size=1024)
            n = 0
            for batch in batches:
                for row in batch.to_pylist():
                    n += 1
                    yield f"{name} row {n}", row
        except (OSError, ValueError) as exc:  # pyarrow's errors derive from these
            raise UserError(f"{key}: cannot read {path}: {_first_line(exc)}") from None


def _unique_columns(names: Sequence[str], path: Path, key: str) -> None:
    """A column named twice would silently lose all but one of its values."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise UserError(
                f"{key}: {path}: column `{name}` appears twice in the header", "rename or remove one of them"
            )
        seen.add(name)


def _json_rows(path: Path, key: str) -> Iterator[Row]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"{key}: {path} is not UTF-8 text (byte {exc.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # JSON Lines saved as .json
            for n, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    yield f"{path.name}:{n}", _json_object(line, f"{path}:{n}", key)
            return
        raise UserError(f"{key}: {path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]}
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise UserError(f"{key}: {path} must hold a list of objects (or use .jsonl, one object per line)")
    for i, row in enumerate(data):
        yield f"{path.name}[{i}]", row


def _json_object(line: str, where: str, key: str) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UserError(f"{key}: {where}: invalid JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(row, dict):
        raise UserError(f"{key}: {where}: expected a JSON object, got {type(row).__name__}")
    return row


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --------------------------------------------------------------------------- formats


def detect_format(rows: Sequence[Row], wanted: str, key: str = "data.format", task: str = "causal_lm") -> str:
    return choose_format(rows[0][1], wanted, key, task)


def choose_format(row: dict[str, Any], wanted: str, key: str = "data.format", task: str = "causal_lm") -> str:
    """The format of rows like `row`: `wanted`, checked against its columns, or detected."""
    columns = set(row)
    if wanted == "auto":
        for fmt in TASKS[task].formats:
            if set(FORMAT_COLUMNS[fmt]) <= columns:
                return fmt
        expected = " or ".join("+".join(FORMAT_COLUMNS[f]) for f in TASKS[task].formats)
        raise UserError(
            f"{key}: cannot tell the format from the columns {sorted(columns)}; expected {expected}",
            "rename the columns, or set data.format",
        )
    if wanted not in TASKS[task].formats:
        raise UserError(
            f"{key}: {wanted} does not fit model.task: {task}; use {' or '.join(TASKS[task].formats)}"
        )
    missing = [c for c in FORMAT_COLUMNS[wanted] if c not in columns]
    if missing:
        raise UserError(f"{key}: {wanted} needs column `{missing[0]}`; the data has {sorted(columns)}")
    return wanted


def _field(row: dict[str, Any], name: str, where: str) -> str:
    value = row.get(name)
    if not isinstance(value, str):
        problem = "is missing" if name not in row else f"must be a string, not {type(value).__name__}"
        raise UserError(f"{where}: `{name}` {problem}")
    return value


def alpaca_prompt(row: dict[str, Any], where: str) -> str:
    """The Alpaca prompt of a row; an empty or missing `input` selects the no-input variant."""
    instruction = _field(row, "instruction", where)
    extra = row.get("input")
    if extra is None:
        extra = ""
    if not isinstance(extra, str):
        raise UserError(f"{where}: `input` must be a string, not {type(extra).__name__}")
    if extra.strip():
        return ALPACA_PROMPT_INPUT.format(instruction=instruction, input=extra)
    return ALPACA_PROMPT.format(instruction=instruction)


def prompt_and_answer(row: dict[str, Any], fmt: str, where: str) -> tuple[str, str]:
    if fmt == "alpaca":
        return alpaca_prompt(row, where), _field(row, "output", where)
    return _field(row, "prompt", where), _field(row, "completion", where)


def chat_messages(row: dict[str, Any], fmt: str, where: str) -> list[dict[str, str]]:
    """The conversation of a messages or ShareGPT row, as `{role, content}` messages."""
    if fmt == "sharegpt":
        return _sharegpt(row, where)
    return _messages(row, where)


def _messages(row: dict[str, Any], where: str) -> list[dict[str, str]]:
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: `messages` must be a non-empty list of {{role, content}}")
    for m in messages:
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("content"), str)
            or m.get("role") not in MESSAGE_ROLES
        ):
            raise UserError(
                f"{where}: each message needs a role ({'/'.join(MESSAGE_ROLES)}) and string content"
            )
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _sharegpt(row: dict[str, Any], where: str) -> list[dict[str, str]]:
    turns = row.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise UserError(f"{where}: `conversations` must be a non-empty list of {{from, value}}")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise UserError(f"{where}: conversations[{i}] needs `from` and a string `value`")
        role = SHAREGPT_ROLES.get(str(turn.get("from")).lower())
        if role is None:
            raise UserError(
                f"{where}: conversations[{i}] has `from: {turn.get('from')}`; "
                f"use one of {', '.join(SHAREGPT_ROLES)}"
            )
        messages.append({"role": role, "content": turn["value"]})
    return messages


def check_row(row: dict[str, Any], fmt: str, where: str) -> None:
    """The row has the fields its format needs, with the right types (no tokenizer needed)."""
    if fmt in CHAT_FORMATS:
        chat_messages(row, fmt, where)
    elif fmt in ("completion", "alpaca"):
        prompt_and_answer(row, fmt, where)
    elif fmt == "classification":
        _field(row, "text", where)
        if not isinstance(row.get("label"), str | int | bool):
            raise UserError(f"{where}: `label` must be a string or an integer")
    else:
        _field(row, "text", where)


def check_rows(rows: Iterable[Row], fmt: str) -> None:
    for where, row in rows:
        check_row(row, fmt, where)


def label_names(rows: Iterable[Row]) -> list[str]:
    return _label_order({row.get("label") for _, row in rows})


def _label_order(labels: set[Any]) -> list[str]:
    """Class names in the order of the classifier's outputs: the distinct integer labels sorted
    by value (so {-1, 1} is two classes, and {0, 50000} too), else the names sorted as text."""
    if all(isinstance(x, int) and not isinstance(x, bool) for x in labels):
        return [str(i) for i in sorted(labels)]
    return sorted({str(x) for x in labels})


@dataclass
class Scan:
    format: str
    rows: int
    labels: list[str] | None  # seq_cls: the class names


def scan(source: Source | str, wanted: str, task: str, key: str = "data.train") -> Scan:
    """Read every row once, streaming, and check it against the format (detected from the first
    row when `wanted` is auto); counts the rows and collects class names."""
    if isinstance(source, str):
        source = Source(source, key)
    fmt_key = "data.format" if key == "data.train" else key
    fmt, count, labels = "", 0, set()
    for where, row in source.rows():
        if not count:
            fmt = choose_format(row, wanted, fmt_key, task)
        check_row(row, fmt, where)
        if fmt == "classification":
            labels.add(row.get("label"))
        count += 1
    if not count:
        raise UserError(f"{key}: {source.spec} has no rows")
    return Scan(fmt, count, _label_order(labels) if fmt == "classification" else None)


def chat_template(section: DataSection, tokenizer: Any = None) -> str | None:
    """The template chat formats render with: `data.chat_template` (a Jinja string, or a path
    to a .jinja file), else the tokenizer's own."""
    value = section.chat_template
    if value is None:
        return getattr(tokenizer, "chat_template", None)
    if "{{" in value or "{%" in value:
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise UserError(
            f"data.chat_template: file not found: {value}",
            "give a Jinja template string or the path of a .jinja file",
        )
    return path.read_text(encoding="utf-8")


# --------------------------------------------------------------------------- encoding


def new_stats() -> dict[str, int]:
    return dict.fromkeys(("rows", "examples", "tokens", "supervised_tokens", "truncated", "dropped"), 0)


class Encoder:
    """Turns rows of one format into training examples for one tokenizer and task.

    causal_lm: `{"input_ids", "labels"}` of equal length (-100 = no loss);
    seq2seq_lm: `{"input_ids"}` (encoder) and `{"labels"}` (decoder targets);
    seq_cls: `{"input_ids", "labels": class id}`.
    Rows are tokenised in batches (one fast-tokenizer call per field per batch).
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
        self.eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        # The special tokens the tokenizer wraps around text (e.g. BOS); EOS is added by us.
        plain = tokenizer("x", add_special_tokens=False)["input_ids"]
        full = tokenizer("x")["input_ids"]
        start = full.index(plain[0]) if plain and plain[0] in full else 0
        self.prefix = [t for t in full[:start] if t != tokenizer.eos_token_id]
        self._fast = _fast_encoder(tokenizer)
        self.template = chat_template(section, tokenizer) if fmt in CHAT_FORMATS else None
        if fmt in CHAT_FORMATS and not self.template:
            raise UserError(
                f"data.format: {fmt} needs a chat template, and this tokenizer has none",
                "set data.chat_template (a Jinja string or a .jinja file), or use the completion format",
            )

    def _ids(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        if self._fast is not None:
            return [e.ids for e in self._fast(texts, add_special_tokens=False)]
        return self.tok(texts, add_special_tokens=False)["input_ids"]

    # ---- rows → examples

    def example(self, row: dict[str, Any], where: str, stats: dict[str, int]) -> dict[str, Any] | None:
        """The training example of a row, truncated to max_length; None (and counted as
        dropped) when truncation leaves nothing to learn from."""
        return self.examples([(where, row)], stats)[0]

    def examples(self, rows: Sequence[Row], stats: dict[str, int]) -> list[dict[str, Any] | None]:
        if self.task == "seq_cls":
            ids = self.tok([_field(r, "text", w) for w, r in rows])["input_ids"]
            return [self._classification(i, r, w, stats) for i, (w, r) in zip(ids, rows, strict=True)]
        if self.task == "seq2seq_lm":
            pairs = [prompt_and_answer(r, self.fmt, w) for w, r in rows]
            sources = self.tok([p for p, _ in pairs])["input_ids"]
            targets = self._ids([a for _, a in pairs])
            return [self._seq2seq(s, t + self.eos, stats) for s, t in zip(sources, targets, strict=True)]
        return [self._causal(ids, labels, stats) for ids, labels in self._labelled(rows)]

    def _causal(self, ids: list[int], labels: list[int], stats: dict[str, int]) -> dict[str, Any] | None:
        stats["rows"] += 1
        max_len = self.section.max_length
        if len(ids) > max_len:
            ids, labels = ids[:max_len], labels[:max_len]
            stats["truncated"] += 1
        # Position 0 is never predicted, so it cannot carry loss.
        supervised = len(labels) - labels.count(IGNORE) - (labels[0] != IGNORE)
        if supervised == 0:
            stats["dropped"] += 1
            return None
        labels[0] = IGNORE
        stats["examples"] += 1
        stats["tokens"] += len(ids)
        stats["supervised_tokens"] += supervised
        return {"input_ids": ids, "labels": labels}

    def _seq2seq(self, source: list[int], target: list[int], stats: dict[str, int]) -> dict[str, Any]:
        stats["rows"] += 1
        max_len = self.section.max_length
        if len(source) > max_len or len(target) > max_len:
            stats["truncated"] += 1
            source, target = source[:max_len], target[:max_len]
        stats["examples"] += 1
        stats["tokens"] += len(source) + len(target)
        stats["supervised_tokens"] += len(target)
        return {"input_ids": source, "labels": target}

    def _classification(
        self, ids: list[int], row: dict[str, Any], where: str, stats: dict[str, int]
    ) -> dict[str, Any]:
        stats["rows"] += 1
        max_len = self.section.max_length
        if len(ids) > max_len:  # keep the closing special token ([SEP])
            ids, stats["truncated"] = ids[: max_len - 1] + ids[-1:], stats["truncated"] + 1
        stats["examples"] += 1
        stats["tokens"] += len(ids)
        stats["supervised_tokens"] += 1
        return {"input_ids": ids, "labels": self.label_id(row, where)}

    def label_id(self, row: dict[str, Any], where: str) -> int:
        label = row.get("label")
        if str(label) not in self.label_ids:
            known = ", ".join(self.label_ids)
            raise UserError(f"{where}: label {label!r} is not one of the training labels ({known})")
        return self.label_ids[str(label)]

    # ---- causal LM: token ids and which of them carry loss

    def encode(self, row: dict[str, Any], where: str) -> tuple[list[int], list[bool]]:
        ids, labels = self._labelled([(where, row)])[0]
        return ids, [y != IGNORE for y in labels]

    def _labelled(self, rows: Sequence[Row]) -> list[tuple[list[int], list[int]]]:
        """Token ids and labels (the token where it carries loss, else IGNORE), untruncated."""
        everything = self.section.train_on == "all"
        if self.fmt == "text":
            texts = self._ids([_field(r, "text", w) for w, r in rows])
            return [(ids, ids[:]) for ids in (self.prefix + t + self.eos for t in texts)]
        if self.fmt in ("completion", "alpaca"):
            pairs = [prompt_and_answer(r, self.fmt, w) for w, r in rows]
            out = []
            prompts, answers = self._ids([p for p, _ in pairs]), self._ids([a for _, a in pairs])
            for p, a in zip(prompts, answers, strict=True):
                p, a = self.prefix + p, a + self.eos
                out.append((p + a, (p if everything else [IGNORE] * len(p)) + a))
            return out
        rendered = [self._render_spans(chat_messages(r, self.fmt, w), w) for w, r in rows]
        enc = self.tok([t for t, _ in rendered], add_special_tokens=False, return_offsets_mapping=True)
        out = []
        for (_, spans), ids, offsets in zip(rendered, enc["input_ids"], enc["offset_mapping"], strict=True):
            labels = [
                t if everything or any(s <= a and b <= e for s, e in spans) else IGNORE
                for t, (a, b) in zip(ids, offsets, strict=True)
            ]
            out.append((ids, labels))
        return out

    def _render(self, messages: list[dict[str, str]], generation_prompt: bool, where: str) -> str:
        from jinja2 import TemplateError

        try:
            return self.tok.apply_chat_template(
                messages,
                chat_template=self.template,
                tokenize=False,
                add_generation_prompt=generation_prompt,
            )
        except TemplateError as exc:
            raise UserError(
                f"{where}: the chat template cannot render this conversation: {_first_line(exc)}",
                "check the conversation's roles, or data.chat_template",
            ) from None

    def _render_spans(self, messages: list[dict[str, str]], where: str) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character spans of its assistant answers, each
        with its end-of-turn token (found by rendering the conversation up to each turn)."""
        text = self._render(messages, False, where)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self._render(messages[:i], True, where)
            through = self._render(messages[: i + 1], False, where)
            if not (text.startswith(before) and text.startswith(through)):
                raise UserError(
                    f"{where}: the chat template does not render conversations incrementally, "
                    "so answers cannot be located; use train_on: all"
                )
            spans.append((len(before), len(through.rstrip())))
        return text, spans

    def reference(self, row: dict[str, Any], where: str) -> Reference | None:
        """The prompt to generate from and the expected answer, where the row has one."""
        if self.fmt in ("completion", "alpaca"):
            prompt, answer = prompt_and_answer(row, self.fmt, where)
            ids = (
                self.tok(prompt)["input_ids"]
                if self.task == "seq2seq_lm"
                else self.prefix + self._ids([prompt])[0]
            )
            return Reference(ids, answer)
        if self.fmt in CHAT_FORMATS:
            messages = chat_messages(row, self.fmt, where)
            if messages[-1]["role"] == "assistant":
                prompt = self._render(messages[:-1], True, where)
                return Reference(self._ids([prompt])[0], messages[-1]["content"])
        return None


def _fast_encoder(tokenizer: Any) -> Any:
    """The Rust tokenizer's `encode_batch_fast` (ids without offsets: about 1.5x faster than the
    transformers call), where it gives the same ids as the transformers call; else None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    fast = getattr(backend, "encode_batch_fast", None)
    if fast is None or backend.truncation is not None or backend.padding is not None:
        return None
    probe = [f"Hello  world\n\t{tokenizer.eos_token or ''} é 1234 {tokenizer.pad_token or ''}x"]
    same = [e.ids for e in fast(probe, add_special_tokens=False)] == tokenizer(
        probe, add_special_tokens=False
    )["input_ids"]
    return fast if same else None


def _batches(rows: Iterable[Row], size: int = BATCH_ROWS) -> Iterator[list[Row]]:
    batch: list[Row] = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def encode_rows(
    rows: Iterable[Row], encoder: Encoder, stats: dict[str, int], with_references: bool = False
) -> Split:
    """Rows → an in-memory split (for small data: `eval --data`, tests)."""
    split = Split([])
    for batch in _batches(rows):
        for (where, row), example in zip(batch, encoder.examples(batch, stats), strict=True):
            if example is None:
                continue
            split.examples.append(example)
            if with_references and (ref := encoder.reference(row, where)) is not None:
                split.references.append(ref)
    return split


def prepare_file(
    path: str, section: DataSection, tokenizer: Any, task: str = "causal_lm", labels: list[str] | None = None
) -> Split:
    """A whole file as one evaluation split, with reference answers where the format has them."""
    source = Source(path, "--data")
    fmt = scan(source, section.format, task, "--data").format
    encoder = Encoder(tokenizer, fmt, section, task, labels)
    return encode_rows(source.rows(), encoder, new_stats(), with_references=True)


# --------------------------------------------------------------------------- prepared data on disk


class _Writer:
    """Appends one split's examples to flat files: int32 tokens and int64 offsets.

    `<split>.input_ids` + `<split>.input_offsets`, `<split>.labels` + `<split>.label_offsets`
    (a class id is a label of length 1), and `<split>.position_ids` for packed rows."""

    def __init__(self, folder: Path, name: str, positions: bool = False):
        parts = ["input_ids", "input_offsets", "labels", "label_offsets"] + (
            ["position_ids"] if positions else []
        )
        self.files = {p: open(folder / f"{name}.{p}.bin", "wb") for p in parts}
        self.n_inputs = self.n_labels = self.count = 0
        for p in ("input_offsets", "label_offsets"):
            self.files[p].write(_int64([0]))

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


class TokenArrays(Sequence):
    """A split's examples, memory-mapped from the cache; `examples[i]` is the same dict of
    token lists an in-memory split holds."""

    def __init__(self, folder: Path, name: str, classes: bool):
        self.classes = classes
        self.input_ids = _map(folder / f"{name}.input_ids.bin", "int32")
        self.input_offsets = _map(folder / f"{name}.input_offsets.bin", "int64")
        self.labels = _map(folder / f"{name}.labels.bin", "int32")
        self.label_offsets = _map(folder / f"{name}.label_offsets.bin", "int64")
        self.position_ids = _map(folder / f"{name}.position_ids.bin", "int32")

    def __len__(self) -> int:
        return len(self.input_offsets) - 1

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        a, b = int(self.input_offsets[i]), int(self.input_offsets[i + 1])
        c, d = int(self.label_offsets[i]), int(self.label_offsets[i + 1])
        example = {
            "input_ids": self.input_ids[a:b].tolist(),
            "labels": int(self.labels[c]) if self.classes else self.labels[c:d].tolist(),
        }
        if self.position_ids is not None:
            example["position_ids"] = self.position_ids[a:b].tolist()
        return example

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]

    def lengths(self) -> np.ndarray:
        import numpy as np

        return np.diff(np.asarray(self.input_offsets))


def cache_root() -> Path:
    from peftcli.home import home

    return home() / "cache" / "data"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Changes with anything about the tokenizer that changes token ids: its vocabulary, merges,
    normalisation and post-processing, special tokens and chat template."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    digest.update(json.dumps(tokenizer.chat_template, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def prepare(section: DataSection, tokenizer: Any, seed: int, task: str = "causal_lm") -> Prepared:
    """Training (and held-out) examples for a data section, from the cache when the same inputs
    were prepared before. A `data.chat_template` is set on the tokenizer, so it is saved with
    the adapter and generation uses it too."""
    if section.chat_template is not None:
        tokenizer.chat_template = chat_template(section, tokenizer)
    train = Source(section.train, "data.train")
    fmt = choose_format(train.first()[1], section.format, "data.format", task)
    if section.format == "auto":
        _say(f"data: format {fmt} (detected from the columns {', '.join(FORMAT_COLUMNS[fmt])})")
    held_out = Source(section.eval, "data.eval") if isinstance(section.eval, str) else None
    if held_out is not None:
        choose_format(held_out.first()[1], fmt, "data.eval", task)
    if fmt in CHAT_FORMATS and not tokenizer.chat_template:
        Encoder(tokenizer, fmt, section, task)  # raises the missing-template error
    fraction = None if held_out is not None or not section.eval else float(section.eval)
    inputs = {
        "version": CACHE_VERSION,
        "train": train.fingerprint(),
        "eval": held_out.fingerprint() if held_out is not None else fraction,
        "seed": seed if fraction or section.packing else None,
        "format": fmt,
        "task": task,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "max_length": section.max_length,
        "train_on": section.train_on,
        "packing": section.packing,
    }
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:24]
    folder = cache_root() / key
    hit = (folder / "meta.json").is_file()
    if not hit:
        started = time.perf_counter()
        _build_atomically(
            folder, lambda tmp: _build(tmp, section, tokenizer, fmt, task, seed, train, held_out)
        )
    prepared = _load(folder, section)
    n = f"{prepared.stats['examples']} examples"
    if section.packing:
        n += f" in {prepared.stats['sequences']} packed rows"
    if hit:
        _say(f"data: loaded {n} from cache ({folder})")
    else:
        _say(f"data: prepared {n} in {time.perf_counter() - started:.1f}s (cached in {folder})")
    prepared.from_cache = hit
    return prepared


def _build_atomically(folder: Path, build: Any) -> None:
    """Build into a temporary folder beside `folder` and rename it into place, so a cache entry
    is complete or absent; when another process got there first, its entry is kept."""
    from peftcli.home import make_dirs

    make_dirs(folder.parent)
    host = socket.gethostname()
    for stale in folder.parent.glob(f".{folder.name}.tmp-{host}-*"):  # left by a killed run here
        pid = stale.name.rpartition("-")[2]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = folder.parent / f".{folder.name}.tmp-{host}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        build(tmp)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _build(
    folder: Path,
    section: DataSection,
    tokenizer: Any,
    fmt: str,
    task: str,
    seed: int,
    train: Source,
    held_out: Source | None,
) -> None:
    """Two streaming passes: check every row (and count them, for the held-out fraction), then
    tokenise in batches and append to the split files."""
    found = scan(train, fmt, task)
    if held_out is not None:
        scan(held_out, fmt, task, "data.eval")
    held: list[int] = []
    if held_out is None and section.eval:
        n_eval = max(1, round(float(section.eval) * found.rows))
        if n_eval >= found.rows:
            raise UserError(
                f"data.eval: holding out {section.eval} of {found.rows} rows leaves nothing to train on"
            )
        held = sorted(random.Random(seed).sample(range(found.rows), n_eval))
    encoder = Encoder(tokenizer, fmt, section, task, found.labels)
    stats, eval_stats = new_stats(), new_stats()
    has_eval = bool(held) or held_out is not None
    writers = {"train": _Writer(folder, "train")}
    if has_eval:
        writers["eval"] = _Writer(folder, "eval")
        references = open(folder / "eval.references.jsonl", "w", encoding="utf-8")

    def write(batch: list[Row], name: str) -> None:
        for (where, row), example in zip(
            batch, encoder.examples(batch, stats if name == "train" else eval_stats), strict=True
        ):
            if example is None:
                continue
            writers[name].add(example)
            if name == "eval" and (ref := encoder.reference(row, where)) is not None:
                references.write(json.dumps({"prompt_ids": ref.prompt_ids, "answer": ref.answer}) + "\n")

    pending: dict[str, list[Row]] = {"train": [], "eval": []}
    next_held = 0
    for i, row in enumerate(train.rows()):
        name = "train"
        if next_held < len(held) and held[next_held] == i:
            name, next_held = "eval", next_held + 1
        pending[name].append(row)
        if len(pending[name]) == BATCH_ROWS:
            write(pending[name], name)
            pending[name] = []
    for name, rows in pending.items():
        if rows:
            write(rows, name)
    if held_out is not None:
        for batch in _batches(held_out.rows()):
            write(batch, "eval")
    for writer in writers.values():
        writer.close()
    if has_eval:
        references.close()
    if not writers["train"].count:
        raise UserError(
            f"data.train: no example has a supervised token within max_length={section.max_length}"
        )
    stats["sequences"] = writers["train"].count
    if section.packing:
        stats["sequences"] = _pack_split(folder, section.max_length, seed)
    meta = {
        "version": CACHE_VERSION,
        "format": fmt,
        "task": task,
        "labels": found.labels,
        "stats": stats,
        "eval_stats": eval_stats if has_eval else None,
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def _load(folder: Path, section: DataSection) -> Prepared:
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    classes = meta["task"] == "seq_cls"
    train = Split(TokenArrays(folder, "train", classes))
    held_out = None
    if meta["eval_stats"] is not None:
        with open(folder / "eval.references.jsonl", encoding="utf-8") as f:
            references = [Reference(**json.loads(line)) for line in f]
        held_out = Split(TokenArrays(folder, "eval", classes), references)
    return Prepared(
        meta["format"],
        train,
        held_out,
        meta["stats"],
        meta["labels"],
        group_by_length=section.group_by_length,
        cache_dir=folder,
    )


# --------------------------------------------------------------------------- packing


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


def _pack_split(folder: Path, max_length: int, seed: int) -> int:
    """Pack the train split on disk (streaming from its memory map); returns the row count."""
    source = TokenArrays(folder, "train", classes=False)
    writer = _Writer(folder, "packed", positions=True)
    for row in pack_plan(source.lengths(), max_length, seed):
        writer.add(_packed_row([source[i] for i in row]))
    writer.close()
    del source
    for path in folder.glob("train.*"):
        path.unlink()
    for path in folder.glob("packed.*"):
        path.rename(folder / ("train" + path.name.removeprefix("packed")))
    return writer.count


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
    # Tokens per row, so rows that carry no example (see train.Shard) can be left out of counts.
    row_tokens = mask.sum(dim=1)
    batch = {
        "input_ids": ids,
        "attention_mask": mask,
        "row_tokens": row_tokens,
        "num_tokens": row_tokens.sum(),
    }
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
