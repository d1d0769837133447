"""Formats: which columns each format needs (detected or checked), the Alpaca prompt, chat
conversations (messages and ShareGPT) as `{role, content}` messages, the chat template, and
`scan`, which checks every row of a source against its format without a tokenizer."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftcli.data.images import check_image, has_images, image_messages
from peftcli.data.sources import Row, Source
from peftcli.errors import UserError
from peftcli.tasks import TASKS

if TYPE_CHECKING:
    from peftcli.recipe import DataSection


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


def string_field(row: dict[str, Any], name: str, where: str) -> str:
    value = row.get(name)
    if not isinstance(value, str):
        problem = "is missing" if name not in row else f"must be a string, not {type(value).__name__}"
        raise UserError(f"{where}: `{name}` {problem}")
    return value


def alpaca_prompt(row: dict[str, Any], where: str) -> str:
    """The Alpaca prompt of a row; an empty or missing `input` selects the no-input variant."""
    instruction = string_field(row, "instruction", where)
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
        return alpaca_prompt(row, where), string_field(row, "output", where)
    return string_field(row, "prompt", where), string_field(row, "completion", where)


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
        string_field(row, "text", where)
        if not isinstance(row.get("label"), str | int | bool):
            raise UserError(f"{where}: `label` must be a string or an integer")
    else:
        string_field(row, "text", where)


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
    answers: int = 0  # chat formats: rows with an assistant turn (the turns training learns)


def _label_kind(label: Any) -> str:
    return "a boolean" if isinstance(label, bool) else "an integer" if isinstance(label, int) else "a string"


def scan(source: Source | str, wanted: str, task: str, key: str = "data.train") -> Scan:
    """Read every row once, streaming, and check it against the format (detected from the first
    row when `wanted` is auto); counts the rows and collects class names."""
    if isinstance(source, str):
        source = Source(source, key)
    fmt_key = "data.format" if key == "data.train" else key
    fmt, count, labels, answers = "", 0, set(), 0
    first: tuple[str, Any] | None = None  # the first label and where it is
    for where, row in source.rows():
        if not count:
            fmt = choose_format(row, wanted, fmt_key, task)
        if TASKS[task].vision:
            messages, files = image_messages(row, where, MESSAGE_ROLES)
            for path in files:
                check_image(path, where)
            answers += any(m["role"] == "assistant" for m in messages)
            count += 1
            continue
        if fmt in CHAT_FORMATS and has_images(row):
            raise UserError(
                f"{where}: this row has an image, and model.task: {task} reads text only",
                "train a vision-language model with model.task: image_text_to_text, or remove the images",
            )
        check_row(row, fmt, where)
        if fmt == "classification":
            label = row.get("label")
            first = first or (where, label)
            if _label_kind(label) != _label_kind(first[1]):
                # 1 and true are one value to Python, "1" and 1 one name to the classifier.
                raise UserError(
                    f"{where}: label {label!r} is {_label_kind(label)}, but {first[0].split(': ', 1)[-1]} has "
                    f"{first[1]!r}, "
                    f"{_label_kind(first[1])}; give every label the same type"
                )
            labels.add(label)
        elif fmt in CHAT_FORMATS:
            answers += any(m["role"] == "assistant" for m in chat_messages(row, fmt, where))
        count += 1
    if not count:
        raise UserError(f"{key}: {source.spec} has no rows")
    return Scan(fmt, count, _label_order(labels) if fmt == "classification" else None, answers)


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
