"""Preference data: pairs (`preference`) and unpaired answers (`unpaired`, for KTO).

A `preference` row holds a prompt and two answers to it, the chosen one first:
- strings: `{"prompt": str, "chosen": str, "rejected": str}`;
- conversations: `chosen` and `rejected` as message lists ending with the assistant's answer,
  either whole (the prompt's turns repeated in both, as UltraFeedback-binarized has them, with
  or without a `prompt` column) or answer-only after a `prompt` (a string — one user turn — or a
  message list).
An `unpaired` row holds one answer and whether it is desirable:
`{"prompt": str | messages, "completion": str | messages, "label": bool}`.

Each answer becomes one sequence, prompt + answer, labelled on the answer only (the same ids and
labels the `completion` and chat formats give in SFT, so an SFT adapter sees the same inputs).
Pairs are stored as two consecutive sequences of the split's token files; `Pairs` and
`Unpaired` read them back as examples the preference collator batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from peftcli.data.formats import MESSAGE_ROLES
from peftcli.data.splits import Examples
from peftcli.errors import UserError
from peftcli.tasks import IGNORE

if TYPE_CHECKING:
    from peftcli.data.encode import Encoder

PAIR_COLUMNS = ("chosen", "rejected")
UNPAIRED_COLUMNS = ("prompt", "completion", "label")


def detect(row: dict[str, Any], wanted: str, objective: str, key: str = "data.format") -> str:
    """The preference format of rows like `row` (`wanted` checked, or detected)."""
    from peftcli.objectives import OBJECTIVES

    fmt = OBJECTIVES[objective].formats[0] if wanted == "auto" else wanted
    need, shape = {
        "preference": (PAIR_COLUMNS, "chosen+rejected (and prompt)"),
        "unpaired": (UNPAIRED_COLUMNS, "prompt+completion+label"),
        "prompts": (("prompt",), "a prompt and the columns the rewards read"),
    }[fmt]
    missing = [c for c in need if c not in row]
    if missing:
        raise UserError(
            f"{key}: training.objective: {objective} needs {fmt} rows ({shape}); "
            f"the data has {sorted(row)}, missing `{missing[0]}`",
            "rename the columns, or convert the data",
        )
    return fmt


def _messages(value: Any, name: str, where: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise UserError(f"{where}: `{name}` must be a string or a non-empty list of {{role, content}}")
    for m in value:
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("content"), str)
            or m.get("role") not in MESSAGE_ROLES
        ):
            raise UserError(
                f"{where}: each message of `{name}` needs a role ({'/'.join(MESSAGE_ROLES)}) and string content"
            )
    return [{"role": m["role"], "content": m["content"]} for m in value]


@dataclass
class Answer:
    """One answer to a prompt: plain strings, or a whole conversation (prompt turns + answer)."""

    prompt: str | None  # plain text
    answer: str | None
    conversation: list[dict[str, str]] | None = None  # chat: ends with the assistant's answer

    @property
    def prompt_key(self) -> Any:
        if self.conversation is not None:
            return [m for m in self.conversation[:-1]]
        return self.prompt


def _answer(row: dict[str, Any], name: str, where: str) -> Answer:
    """Row column `name` (chosen, rejected or completion) as an answer to the row's prompt."""
    if name not in row:
        raise UserError(f"{where}: `{name}` is missing")
    value, prompt = row[name], row.get("prompt")
    if isinstance(value, str):
        if not isinstance(prompt, str):
            problem = "is missing" if prompt is None else "must be a string when the answers are strings"
            raise UserError(f"{where}: `prompt` {problem}")
        return Answer(prompt, value)
    turns = _messages(value, name, where)
    if prompt is not None:
        if isinstance(prompt, str):
            lead = [{"role": "user", "content": prompt}]
        else:
            lead = _messages(prompt, "prompt", where)
        if turns[: len(lead)] != lead:  # answer-only: the prompt comes first
            turns = lead + turns
    if turns[-1]["role"] != "assistant":
        raise UserError(
            f"{where}: `{name}` must end with the assistant's answer, not a {turns[-1]['role']} turn"
        )
    if len(turns) < 2:
        raise UserError(
            f"{where}: `{name}` has an answer but no prompt; add a `prompt` column or the user turn"
        )
    return Answer(None, None, turns)


def pair(row: dict[str, Any], where: str) -> tuple[Answer, Answer]:
    """The chosen and rejected answers of a `preference` row, checked."""
    chosen, rejected = _answer(row, "chosen", where), _answer(row, "rejected", where)
    if (chosen.conversation is None) != (rejected.conversation is None):
        raise UserError(f"{where}: `chosen` and `rejected` must both be strings or both be conversations")
    if chosen.prompt_key != rejected.prompt_key:
        raise UserError(
            f"{where}: the prompt differs between `chosen` and `rejected`; a pair answers one prompt"
        )
    if (chosen.answer, chosen.conversation) == (rejected.answer, rejected.conversation):
        raise UserError(f"{where}: `chosen` and `rejected` are the same answer; the pair prefers nothing")
    return chosen, rejected


def unpaired(row: dict[str, Any], where: str) -> tuple[Answer, bool]:
    """The answer of an `unpaired` row and whether it is desirable."""
    label = row.get("label")
    if not isinstance(label, bool):
        raise UserError(f"{where}: `label` must be true (desirable) or false (undesirable), not {label!r}")
    return _answer(row, "completion", where), label


def check_row(row: dict[str, Any], fmt: str, where: str) -> None:
    if fmt == "prompts":  # GRPO: a prompt, text or messages (data.prompts renders it)
        if not isinstance(row.get("prompt"), str):
            _messages(row.get("prompt"), "prompt", where)
        return
    pair(row, where) if fmt == "preference" else unpaired(row, where)


# --------------------------------------------------------------------------- encoding


def encode_answer(encoder: Encoder, answer: Answer, where: str) -> tuple[list[int], list[int]]:
    """Token ids of prompt + answer, and labels: the answer's tokens (with EOS, or the chat
    template's end of turn), IGNORE on the prompt — as SFT encodes a completion or chat row."""
    if answer.conversation is None:
        prompt = encoder.prefix + encoder._ids([answer.prompt])[0]
        reply = encoder._ids([answer.answer])[0] + encoder.eos
        return prompt + reply, [IGNORE] * len(prompt) + reply
    if encoder.template is None:  # the encoder was made for string answers
        from peftcli.data.formats import chat_template

        encoder.template = chat_template(encoder.section, encoder.tok) or ""
    if not encoder.template:
        raise UserError(
            "data.format: preference conversations need a chat template, and this tokenizer has none",
            "set data.chat_template (a Jinja string or a .jinja file), or give the pairs as strings",
        )
    text, spans = encoder._render_spans(answer.conversation, where)
    start = spans[-1][0]  # only the final answer is scored; earlier turns are context
    enc = encoder.tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [
        t if a >= start and b <= spans[-1][1] else IGNORE
        for t, (a, b) in zip(ids, enc["offset_mapping"], strict=True)
    ]
    return ids, labels


def truncate(ids: list[int], labels: list[int], max_length: int) -> tuple[list[int], list[int], bool] | None:
    """Truncated to max_length (the prompt's start kept); None when no answer token is left."""
    cut = len(ids) > max_length
    ids, labels = ids[:max_length], labels[:max_length]
    labels = [IGNORE] + labels[1:]  # position 0 is never predicted
    if all(y == IGNORE for y in labels):
        return None
    return ids, labels, cut


def encode_pair(
    encoder: Encoder, row: dict[str, Any], where: str, stats: dict[str, int]
) -> list[dict[str, Any]] | None:
    """A `preference` row as [chosen, rejected] sequences, or None when truncation leaves either
    answer empty (counted as dropped)."""
    stats["rows"] += 1
    chosen, rejected = pair(row, where)
    out = []
    truncated = False
    for answer in (chosen, rejected):
        fitted = truncate(*encode_answer(encoder, answer, where), encoder.section.max_length)
        if fitted is None:
            stats["dropped"] += 1
            return None
        ids, labels, cut = fitted
        truncated |= cut
        out.append({"input_ids": ids, "labels": labels})
    stats["examples"] += 1
    stats["truncated"] += truncated
    for e in out:
        stats["tokens"] += len(e["input_ids"])
        stats["supervised_tokens"] += sum(y != IGNORE for y in e["labels"])
    return out


def encode_unpaired(
    encoder: Encoder, row: dict[str, Any], where: str, stats: dict[str, int]
) -> tuple[dict[str, Any], bool] | None:
    stats["rows"] += 1
    answer, desirable = unpaired(row, where)
    fitted = truncate(*encode_answer(encoder, answer, where), encoder.section.max_length)
    if fitted is None:
        stats["dropped"] += 1
        return None
    ids, labels, cut = fitted
    stats["examples"] += 1
    stats["truncated"] += cut
    stats["tokens"] += len(ids)
    stats["supervised_tokens"] += sum(y != IGNORE for y in labels)
    return {"input_ids": ids, "labels": labels}, desirable


# --------------------------------------------------------------------------- reading back


class Pairs(Examples):
    """A split of pairs over its sequences (chosen at 2i, rejected at 2i+1): `pairs[i]` is
    `{"index": i, "chosen": {...}, "rejected": {...}}`."""

    def __init__(self, sequences: Sequence[dict[str, Any]]):
        self.sequences = sequences

    def __len__(self) -> int:
        return len(self.sequences) // 2

    def item(self, i: int) -> Any:
        return {"index": i, "chosen": self.sequences[2 * i], "rejected": self.sequences[2 * i + 1]}

    def lengths(self) -> Any:
        import numpy as np

        lengths = np.asarray(self.sequences.lengths())
        return np.maximum(lengths[0::2], lengths[1::2])


class Unpaired(Examples):
    """A KTO split: `examples[i]` is `{"index": i, "answer": {...}, "desirable": bool, "kl": {...}}`,
    where `kl` is the same prompt with the answer of example i+1 (cyclically): a mismatched pair
    whose log-ratio estimates the KL term, fixed per example so its reference is precomputed."""

    def __init__(self, sequences: Sequence[dict[str, Any]], desirable: list[bool]):
        self.sequences, self.desirable = sequences, desirable

    def __len__(self) -> int:
        return len(self.desirable)

    def item(self, i: int) -> Any:
        answer = self.sequences[i]
        other = self.sequences[(i + 1) % len(self)]
        return {"index": i, "answer": answer, "desirable": self.desirable[i], "kl": mismatched(answer, other)}

    def lengths(self) -> Any:
        import numpy as np

        return np.asarray(self.sequences.lengths())


def mismatched(own: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """`own`'s prompt followed by `other`'s answer, labelled on the answer."""
    first = next(i for i, y in enumerate(own["labels"]) if y != IGNORE)
    start = next(i for i, y in enumerate(other["labels"]) if y != IGNORE)
    answer = other["input_ids"][start:]
    return {"input_ids": own["input_ids"][:first] + answer, "labels": [IGNORE] * first + answer}


def preview(
    encoder: Encoder, row: dict[str, Any], fmt: str, where: str
) -> list[tuple[str, list[int], list[int]]]:
    """(name, ids, labels) of each sequence a row becomes, for `peftcli data`."""
    if fmt == "preference":
        chosen, rejected = pair(row, where)
        return [
            (n, *encode_answer(encoder, a, where)) for n, a in (("chosen", chosen), ("rejected", rejected))
        ]
    answer, desirable = unpaired(row, where)
    return [("desirable" if desirable else "undesirable", *encode_answer(encoder, answer, where))]


def scan(source: Any, wanted: str, objective: str, key: str = "data.train") -> tuple[str, int]:
    """Read every row of a source (or a path) once, streaming, and check it (format detected
    from the first row when `wanted` is auto); returns the format and the number of rows."""
    from peftcli.data.sources import Source

    if isinstance(source, str):
        source = Source(source, key)
    fmt, count = "", 0
    for where, row in source.rows():
        if not count:
            fmt = detect(row, wanted, objective, "data.format" if key == "data.train" else key)
        check_row(row, fmt, where)
        count += 1
    if not count:
        raise UserError(f"{key}: {source.spec} has no rows")
    return fmt, count


def encode_file(
    path: str, section: Any, tokenizer: Any, objective: str, key: str = "--data"
) -> Sequence[dict[str, Any]]:
    """A whole file of pairs (or KTO answers) as in-memory examples, for `peftcli eval --data`."""
    from peftcli.data.encode import Encoder, new_stats
    from peftcli.data.sources import Source

    fmt, _ = scan(path, "auto", objective, key)
    encoder = Encoder(tokenizer, "completion", section, "causal_lm")
    stats = new_stats()
    sequences: list[dict[str, Any]] = []
    desirable: list[bool] = []
    for where, row in Source(path, key).rows():
        if fmt == "preference":
            sequences += encode_pair(encoder, row, where, stats) or []
        elif (encoded := encode_unpaired(encoder, row, where, stats)) is not None:
            sequences.append(encoded[0])
            desirable.append(encoded[1])
    if not sequences:
        raise UserError(f"{key}: no row keeps an answer token within max_length={section.max_length}")
    held = _Listed(sequences)
    return Pairs(held) if fmt == "preference" else Unpaired(held, desirable)


class _Listed(list):
    """In-memory sequences with the `lengths()` token files have."""

    def lengths(self) -> Any:
        import numpy as np

        return np.array([len(s["input_ids"]) for s in self], dtype=np.int64)


def preference_format(path: str) -> str | None:
    """The preference format a file's columns hold (`preference`: pairs; `unpaired`: labelled
    answers), or None."""
    from peftcli.data.sources import Source

    columns = set(Source(path, "--data").first()[1])
    if set(PAIR_COLUMNS) <= columns:
        return "preference"
    if set(UNPAIRED_COLUMNS) <= columns and isinstance(Source(path, "--data").first()[1].get("label"), bool):
        return "unpaired"
    return None
