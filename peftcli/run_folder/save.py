"""What a run leaves: its adapter (with tokenizer and class names), eval.json written whole, and
a later evaluation's results merged into both eval.json and the model card."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from peftcli import outputs
from peftcli.cards import write_run_card
from peftcli.run_folder.layout import LABELS, Layout, is_run


def save_adapter(
    peft_model: Any, tokenizer: Any, labels: list[str] | None, folder: Path, state: dict | None = None
) -> None:
    """`state`: the adapter's tensors gathered whole, where the model is sharded (FSDP)."""
    peft_model.save_pretrained(folder, state_dict=state)
    tokenizer.save_pretrained(folder)
    if labels:  # class names, in the order of the classifier's outputs
        (folder / LABELS).write_text(json.dumps(labels) + "\n", encoding="utf-8")
    outputs.follow_umask(folder)  # safetensors writes its files 0600


def write_json(path: Path, obj: Any) -> None:
    outputs.write_text(path, json.dumps(obj, indent=2) + "\n")


def update_results(run_dir: Path | None, change: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """A later evaluation's results into a run's eval.json (`change(previous) -> new`), written
    whole, and its model card with them; only in a folder peftcli made for a run."""
    if run_dir is None or not is_run(run_dir):
        return
    layout = Layout(run_dir)
    write_json(layout.results, change(layout.read_results()))
    write_run_card(run_dir)
