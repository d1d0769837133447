"""Prompts for online RL (`prompts`, GRPO): each row a `prompt` — plain text, or chat messages
ending with a user turn — plus whatever other columns the rewards read (an `answer` for
exact_match, ...).

A text prompt is tokenised as the `completion` format tokenises its prompt (the tokenizer's
leading special tokens, then the text); messages are rendered with the run's chat template and
its generation prompt, as SFT renders a conversation before the answer. Prompts are few and
short, so they are kept in memory rather than in the token cache.
"""

from __future__ import annotations

from typing import Any

from peftcli.data.encode import Encoder
from peftcli.data.preference import _messages
from peftcli.data.sources import Source
from peftcli.data.splits import Prepared, Split
from peftcli.errors import UserError


def _example(encoder: Encoder, row: dict[str, Any], where: str, index: int) -> dict[str, Any]:
    if "prompt" not in row:
        raise UserError(
            f"{where}: training.objective: grpo needs prompts rows (`prompt` and the columns the rewards "
            f"read); this row has {sorted(row)}",
            "rename the column to `prompt`",
        )
    prompt = row["prompt"]
    if isinstance(prompt, str):
        ids = encoder.prefix + encoder._ids([prompt])[0]
    else:
        messages = _messages(prompt, "prompt", where)
        if messages[-1]["role"] == "assistant":
            raise UserError(f"{where}: `prompt` ends with an assistant turn; the model writes that one")
        ids = encoder._ids([encoder._render(messages, True, where)])[0]
    columns = {k: v for k, v in row.items() if k != "prompt"}
    return {"input_ids": ids, "prompt": prompt, "columns": columns, "row": index}


def prepare_prompts(
    section: Any, tokenizer: Any, train: Source, held_out: Source | None, held: list[int]
) -> Prepared:
    """The training (and held-out) prompts; `held`: the rows of `train` held out for eval."""
    rows = list(train.rows())
    chat = any(not isinstance(r.get("prompt"), str) for _, r in rows[:1])
    encoder = Encoder(tokenizer, "messages" if chat else "completion", section)
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "eval": []}
    dropped, held_set = 0, set(held)
    sources = [("train", i, w, r) for i, (w, r) in enumerate(rows)]
    if held_out is not None:
        sources += [("eval", i, w, r) for i, (w, r) in enumerate(held_out.rows())]
    for name, i, where, row in sources:
        example = _example(encoder, row, where, i)
        if len(example["input_ids"]) > section.max_length:
            dropped += 1  # a prompt the model cannot see whole would be answered wrongly
            continue
        splits["eval" if name == "eval" or i in held_set else "train"].append(example)
    if not splits["train"]:
        raise UserError(f"{train.key}: no prompt fits within data.max_length={section.max_length}")
    tokens = sum(len(e["input_ids"]) for e in splits["train"])
    stats = {
        "examples": len(splits["train"]),
        "tokens": tokens,
        "supervised_tokens": 0,  # the completions are sampled in training
        "truncated": 0,
        "dropped": dropped,
        "sequences": len(splits["train"]),
    }
    return Prepared(
        "prompts",
        Split(splits["train"]),
        Split(splits["eval"]) if splits["eval"] else None,
        stats,
        None,
        max_length=section.max_length,
    )


def encode_file(path: str, section: Any, tokenizer: Any) -> Split:
    """A file of held-out prompts, for `peftcli eval --data` of a GRPO run (rendered as the run's
    prompts are: `section` is its data section)."""
    return prepare_prompts(section, tokenizer, Source(path, "--data"), None, []).train
