"""What a run leaves: its adapter (with tokenizer and class names) and eval.json, written whole
(a later evaluation's results: `cards.update_results`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from peftcli import outputs
from peftcli.run_folder.layout import LABELS


def save_adapter(
    save_model: Callable[[Any, Path, dict | None], None],
    peft_model: Any,
    tokenizer: Any,
    labels: list[str] | None,
    folder: Path,
    state: dict | None = None,
) -> None:
    """`save_model(peft_model, folder, state)` writes the adapter (the methods stage's: PiSSA and
    OLoRA converted for the original base); `state`: the adapter's tensors gathered whole, where
    the model is sharded (FSDP)."""
    save_model(peft_model, folder, state)
    getattr(tokenizer, "processor", tokenizer).save_pretrained(folder)  # a processor: its tokenizer too
    if labels:  # class names, in the order of the classifier's outputs
        (folder / LABELS).write_text(json.dumps(labels) + "\n", encoding="utf-8")
    outputs.follow_umask(folder)  # safetensors writes its files 0600


def write_json(path: Path, obj: Any) -> None:
    outputs.write_text(path, json.dumps(obj, indent=2) + "\n")
