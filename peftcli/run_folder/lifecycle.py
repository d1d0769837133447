"""A run folder's life: made (marked as peftcli's, `.incomplete` inside) only once everything it
needs has loaded, reopened to resume, forgotten if it fails before its first step, finished
(an `--overwrite` run swapped in for the old one only then)."""

from __future__ import annotations

import shutil
from pathlib import Path

from peftcli import outputs
from peftcli.errors import UserError
from peftcli.run_folder.layout import Layout, is_run, keep_metrics_until, read_state
from peftcli.run_folder.lock import writable
from peftcli.run_folder.plan import Plan


def create(work_dir: Path) -> None:
    """Make the run folder (marked as peftcli's) and flag it unfinished until training ends."""
    work_dir.mkdir(parents=True, exist_ok=True)
    outputs.mark(work_dir, "run")
    Layout(work_dir).incomplete.touch()


def discard_partial(plan_: Plan) -> None:
    """Leftovers of an earlier --overwrite that never got to a checkpoint hold nothing to keep."""
    if plan_.creates and plan_.work_dir != plan_.run_dir and plan_.work_dir.exists():
        if not is_run(plan_.work_dir):
            raise UserError(
                f"{plan_.work_dir} exists and is not a peftcli run folder", "move it away and try again"
            )
        shutil.rmtree(plan_.work_dir)


def open_run(plan_: Plan, recipe_yaml: str, start: Path | None) -> None:
    """Make (or reopen) the run folder for training: the marker, `.incomplete`, the resolved
    recipe, and a metrics.jsonl holding only the steps up to the checkpoint it resumes from."""
    if not plan_.continuing:
        discard_partial(plan_)
        writable(plan_.work_dir.parent)
        create(plan_.work_dir)
    plan_.work.recipe.write_text(recipe_yaml, encoding="utf-8")
    keep_metrics_until(plan_.work.metrics, read_state(start)["step"] if start else 0)


def forget(plan_: Plan) -> None:
    """Leave the folder as the run found it: removed if the run made it, else empty again."""
    if plan_.creates:
        shutil.rmtree(plan_.work_dir, ignore_errors=True)
        return
    for child in plan_.work_dir.iterdir() if plan_.work_dir.is_dir() else []:
        shutil.rmtree(child) if child.is_dir() else child.unlink()


def finish(plan_: Plan) -> None:
    """Training ended: the run is complete; an --overwrite run replaces the old one now."""
    plan_.work.incomplete.unlink(missing_ok=True)
    outputs.follow_umask(plan_.work_dir)  # checkpoints and reference written before this one
    if plan_.work_dir == plan_.run_dir:
        return
    outputs.swap_in(plan_.work_dir, plan_.run_dir)
