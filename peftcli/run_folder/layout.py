"""Every path of a run folder, named once: nothing else in peftcli spells a run file's name.

runs/NAME/                    Layout(run_dir)
  .peftcli                    .marker       {"kind": "run"} (older runs: .peftcli-run)
  .incomplete                 .incomplete   until training ends
  recipe.yaml                 .recipe       the resolved recipe
  adapter/                    .adapter      PEFT save_pretrained + tokenizer
    README.md                 .card         its Hub model card
    labels.json               .labels       class names (seq_cls)
  metrics.jsonl               .metrics      one row per logged step
  eval.json                   .results      final metrics, samples, training summary
  loss.png                    .plot
  reference.safetensors       .reference    the reference model's log-probs (dpo, kto); grpo with init_from and beta: the starting adapter's weights
  coverage.json               .coverage     what the adapter reaches, per kind of parameter
  checkpoints/step-N/         .checkpoint(N)  state.json last (see training/checkpoint.py)
runs/.NAME.partial/           .partial      an --overwrite run building
runs/.NAME.lock               .lock         the training process's claim
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftcli import outputs
from peftcli.errors import UserError

MARKER = outputs.MARKER
INCOMPLETE = ".incomplete"
RECIPE = "recipe.yaml"
ADAPTER = "adapter"
CARD = "README.md"  # the Hub's model card file, in an adapter or a merged model folder
LABELS = "labels.json"
METRICS = "metrics.jsonl"
RESULTS = "eval.json"
PLOT = "loss.png"
REFERENCE = "reference.safetensors"
COVERAGE = "coverage.json"
CHECKPOINTS = "checkpoints"
STATE = "state.json"  # a checkpoint's last file: its presence makes the checkpoint complete
ADAPTER_CONFIG = "adapter_config.json"  # PEFT's names, inside an adapter folder
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_STEP = re.compile(r"^step-(\d+)$")

# What a run folder made by an older peftcli (without MARKER) may contain: recognised as a run
# only when it holds recipe.yaml, something only training writes, and nothing else.
TRAINED_ENTRIES = {INCOMPLETE, ADAPTER, METRICS, CHECKPOINTS}
RUN_ENTRIES = {MARKER, outputs.LEGACY_RUN_MARKER, INCOMPLETE, RECIPE, ADAPTER, METRICS, RESULTS, PLOT}
RUN_ENTRIES |= {REFERENCE, CHECKPOINTS, COVERAGE}
# What `peftcli push` uploads beside the adapter.
SHARED_FILES = (RECIPE, RESULTS, METRICS, PLOT)


@dataclass(frozen=True)
class Layout:
    """The paths of the run folder `root` (which need not exist)."""

    root: Path

    @property
    def marker(self) -> Path:
        return self.root / MARKER

    @property
    def incomplete(self) -> Path:
        return self.root / INCOMPLETE

    @property
    def recipe(self) -> Path:
        return self.root / RECIPE

    @property
    def adapter(self) -> Path:
        return self.root / ADAPTER

    @property
    def card(self) -> Path:
        return self.adapter / CARD

    @property
    def labels(self) -> Path:
        return self.adapter / LABELS

    @property
    def metrics(self) -> Path:
        return self.root / METRICS

    @property
    def results(self) -> Path:
        return self.root / RESULTS

    @property
    def plot(self) -> Path:
        return self.root / PLOT

    @property
    def reference(self) -> Path:
        return self.root / REFERENCE

    @property
    def coverage(self) -> Path:
        return self.root / COVERAGE

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step-{step}"

    def checkpoint_tmp(self, step: int) -> Path:
        """Where checkpoint `step` is written before it is renamed into place."""
        return self.checkpoints / f".step-{step}.tmp"

    @property
    def partial(self) -> Path:
        """Where an `--overwrite` run builds before it replaces the run."""
        return self.root.with_name(f".{self.root.name}.partial")

    @property
    def lock(self) -> Path:
        """Beside the run, so it covers the run and its `.partial` twin alike."""
        return self.root.with_name(f".{self.root.name}.lock")

    def shared_files(self) -> list[Path]:
        return [self.root / name for name in SHARED_FILES]

    def read_results(self) -> dict[str, Any]:
        """eval.json, or {} where the run has none yet."""
        return json.loads(self.results.read_text(encoding="utf-8")) if self.results.is_file() else {}


def adapter_file(folder: Path, weights: bool = False) -> Path:
    """An adapter folder's adapter_config.json (or, `weights`, its adapter_model.safetensors)."""
    return folder / (ADAPTER_WEIGHTS if weights else ADAPTER_CONFIG)


def has_adapter(folder: Path) -> bool:
    return adapter_file(folder).is_file()


# --------------------------------------------------------------------------- checkpoints


def state_file(checkpoint: Path) -> Path:
    return checkpoint / STATE


def checkpoint_adapter(checkpoint: Path) -> Path:
    return checkpoint / ADAPTER


def step_of(checkpoint: Path) -> int | None:
    """N for a folder named step-N, else None."""
    match = _STEP.match(checkpoint.name)
    return int(match[1]) if match else None


def is_checkpoints(folder: Path) -> bool:
    return folder.name == CHECKPOINTS


def all_checkpoints(root: Path) -> list[Path]:
    """Every step-N folder under `root` (complete or not), oldest first."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if step_of(p) is not None), key=step_of)


def complete(root: Path) -> list[Path]:
    """Complete checkpoints under `root` (a run's checkpoints/), oldest first."""
    return [p for p in all_checkpoints(root) if state_file(p).is_file()]


def latest(root: Path) -> Path | None:
    found = complete(root)
    return found[-1] if found else None


def read_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads(state_file(checkpoint).read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- what a folder is


def is_run(path: Path) -> bool:
    """A folder peftcli made for a run (by its marker; older runs by their contents)."""
    if not path.is_dir():
        return False
    if (kind := outputs.kind_of(path)) is not None:
        return kind == "run"
    names = {p.name for p in path.iterdir()}
    return RECIPE in names and bool(names & TRAINED_ENTRIES) and names <= RUN_ENTRIES


def is_unfinished(path: Path) -> bool:
    return Layout(path).incomplete.exists()


def has_checkpoints(path: Path) -> bool:
    return latest(Layout(path).checkpoints) is not None


# --------------------------------------------------------------------------- metrics.jsonl


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of `metrics.jsonl`; a last line torn by a killed process is left out."""
    if not path.is_file():
        return []
    rows = []
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    for number, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise UserError(f"{path}: line {number} is not JSON", "repair or delete the line") from None
    return rows


def keep_metrics_until(path: Path, step: int) -> None:
    """Drop rows a killed run logged after its last checkpoint (each step appears once), and a
    last line it tore while writing."""
    if path.is_file():
        rows = [r for r in read_metrics(path) if r.get("step", 0) <= step]
        outputs.write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
