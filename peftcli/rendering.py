"""How a run's prompts are rendered: through its chat template, or as raw text.

A run trained on conversations (`messages`, `sharegpt`, or preference pairs whose answers are
conversations) saw every prompt through its chat template, so `generate` and `eval --harness`
render prompts the same way unless told otherwise. `train` records the answer in eval.json
(`train.chat`); runs made before that are answered from the first row of their training data.
"""

from __future__ import annotations

from typing import Any

from peftcli.errors import UserError

CHAT = ("messages", "sharegpt")


def data_is_chat(data: Any, task: str) -> bool:
    """Whether the recipe's data section trains on conversations (reads its first row)."""
    from peftcli.data.formats import choose_format
    from peftcli.data.sources import Source

    if data.format in CHAT:
        return True
    if data.format not in ("auto", "preference", "unpaired"):
        return False
    try:
        first = next(iter(Source(data.train).rows()), None)
    except (UserError, OSError):
        return False  # the data is gone (a run copied elsewhere): nothing says it was chat
    if first is None:
        return False
    row = first[1]
    if data.format == "auto" and not {"chosen", "rejected", "label"} & set(row):
        try:
            return choose_format(row, "auto", task=task) in CHAT
        except UserError:
            return False
    return any(isinstance(row.get(k), list) for k in ("prompt", "chosen", "rejected", "completion"))


def run_is_chat(target: Any) -> bool:
    """The run trained on conversations: as recorded at training, else from its data."""
    if target.recipe is None:
        return False
    if target.run_dir is not None:
        from peftcli.run_folder.layout import Layout

        recorded = Layout(target.run_dir).read_results().get("train", {}).get("chat")
        if isinstance(recorded, bool):
            return recorded
    return data_is_chat(target.recipe.data, target.model.task)
