"""Where a `train` writes, decided before anything is touched: the folder a recipe may use, the
plan (fresh, resumed, or an `--overwrite` twin), and the checkpoint a resumed run continues from.
Everything here only reads."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftcli import outputs
from peftcli.errors import UserError
from peftcli.run_folder.layout import Layout, has_checkpoints, is_run, is_unfinished, latest, read_state
from peftcli.tasks import TASKS

if TYPE_CHECKING:
    from peftcli.recipe import Recipe

# Recipe keys that may change between a run and its resumption: they do not change the math.
RESUMABLE_CHANGES = {
    "name",
    "training.output_dir",
    "training.log_every",
    "training.eval_every",
    "training.save_every",
    "training.keep_checkpoints",
    "training.report_to",
    "training.gradient_checkpointing",
    "training.collective_timeout",
}


def protected_paths(recipe: Recipe) -> list[Path]:
    """Local files the recipe reads: no output folder may hold (and so replace) them."""
    data = recipe.data
    paths = [data.train, data.eval if isinstance(data.eval, str) else None, data.chat_template]
    return [Path(p) for p in paths if p and Path(p).expanduser().exists()]


def check_location(run_dir: Path, protected: list[Path]) -> None:
    """Refuse a run folder that would hold, or be, something that is not peftcli's to replace."""
    outputs.check_location(
        run_dir,
        "training.output_dir",
        protected,
        hint="set training.output_dir to a new folder, e.g. runs/<name>",
        reader="this recipe",
    )


@dataclass
class Plan:
    """Where a `train` writes, and how it got there."""

    run_dir: Path  # the folder the user named
    work_dir: Path  # where this process writes: run_dir, or its .partial twin for --overwrite
    continuing: bool  # resumes the unfinished run in work_dir
    creates: bool  # work_dir is made by this run (and removed again if it fails before step 1)

    @property
    def work(self) -> Layout:
        return Layout(self.work_dir)

    @property
    def run(self) -> Layout:
        return Layout(self.run_dir)


def plan_folder(run_dir: Path, overwrite: bool, resume: bool) -> Plan:
    """Decide where a `train` writes; refuse what would destroy or mix anything. Reads only;
    the folder's location is the validation pass's (peftcli.validation)."""
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other", "pick one")
    partial = Layout(run_dir).partial
    stranded = is_run(partial) and has_checkpoints(partial)
    if resume:
        if stranded:  # an interrupted --overwrite run: continue building it
            return Plan(run_dir, partial, True, False)
        if not is_run(run_dir) or not is_unfinished(run_dir):
            state = "holds a finished run" if is_run(run_dir) else "holds no run"
            raise UserError(
                f"{run_dir} {state}; there is nothing to resume",
                "pass --overwrite to train it again" if is_run(run_dir) else "train it without --resume",
            )
        return Plan(run_dir, run_dir, True, False)
    if stranded:
        raise UserError(
            f"{run_dir} has an interrupted --overwrite run with checkpoints in {partial}",
            f"pass --resume to continue it, or delete {partial} to start again",
        )
    if not run_dir.exists() or (run_dir.is_dir() and not any(run_dir.iterdir())):
        return Plan(run_dir, run_dir, False, not run_dir.exists())
    if not is_run(run_dir):
        raise UserError(
            f"training.output_dir: {run_dir} is not a peftcli run folder (it holds {outputs.shown(run_dir)}); "
            "peftcli writes into and replaces only its own runs",
            "choose a new or empty folder for training.output_dir",
        )
    if not overwrite:
        unfinished = is_unfinished(run_dir)
        state = "an unfinished run" if unfinished else "a run"
        hint = "pass --resume to continue it, " if unfinished else "pass "
        raise UserError(
            f"{run_dir} already holds {state}",
            f"{hint}--overwrite to replace it, or set training.output_dir / name",
        )
    return Plan(run_dir, partial, False, True)


def check_can_start(recipe: Recipe, overwrite: bool, resume: bool) -> Plan:
    """What refuses a launched `train` before any process starts: another `train` in the folder,
    and a folder it may not use (the location was validated with the recipe)."""
    from peftcli.run_folder.lock import check_free

    check_free(recipe.output_dir)
    return plan_folder(recipe.output_dir, overwrite, resume)


# --------------------------------------------------------------------------- resuming


def file_digest(path: str | None) -> str | None:
    """sha256 of a local data file or folder (None for hub datasets)."""
    if not path or not Path(path).exists():
        return None
    h = hashlib.sha256()
    files = [Path(path)] if Path(path).is_file() else sorted(p for p in Path(path).rglob("*") if p.is_file())
    for f in files:
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def fingerprint(recipe_dump: dict[str, Any], num_processes: int, encoding: dict[str, int]) -> dict[str, Any]:
    """What a checkpoint depends on: a resumed run must match it (see `differences`).
    `encoding`: the data stage's versions of how rows become token ids (data.cache.encoding)."""
    data = recipe_dump["data"]
    return {
        "recipe": recipe_dump,
        "train_data": file_digest(data["train"]),
        "eval_data": file_digest(data["eval"]) if isinstance(data["eval"], str) else None,
        "num_processes": num_processes,
        "encoding": encoding,
    }


def _encoding(saved: dict[str, Any]) -> dict[str, int]:
    """The encoding a checkpoint was made with. Checkpoints from before it was recorded encoded
    text as version 2 does, and image+text conversations without the processor's BOS (vision 1)."""
    if "encoding" in saved:
        return saved["encoding"]
    return {"cache": 2, **({"vision": 1} if TASKS[saved["recipe"]["model"]["task"]].vision else {})}


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What changed since the checkpoint, in ways that would make the resumed run differ."""
    changes = []
    old, new = _flatten(saved["recipe"]), _flatten(current["recipe"])
    # Keys only one side has come from a different peftcli version and keep their defaults.
    for key in sorted(set(old) & set(new)):
        if key not in RESUMABLE_CHANGES and old[key] != new[key]:
            changes.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
    for key, what in (("train_data", "the data.train file"), ("eval_data", "the data.eval file")):
        if saved.get(key) != current.get(key):
            changes.append(f"{what} changed content")
    if _encoding(saved) != current["encoding"]:
        changes.append(
            f"the data encoding changed with peftcli: {_encoding(saved)} -> {current['encoding']} "
            "(the rows would become other token ids)"
        )
    if saved["num_processes"] != current["num_processes"]:
        changes.append(f"number of processes: {saved['num_processes']} -> {current['num_processes']}")
    return changes


def resume_point(run_dir: Path, fingerprint_: dict[str, Any]) -> Path | None:
    """The newest complete checkpoint, refusing one made under a different recipe or data."""
    checkpoint = latest(Layout(run_dir).checkpoints)
    if checkpoint is None:
        return None
    changes = differences(read_state(checkpoint)["fingerprint"], fingerprint_)
    if changes:
        raise UserError(
            f"cannot resume {run_dir} from {checkpoint.name}: " + "; ".join(changes),
            "restore the original recipe and data, or pass --overwrite to start again",
        )
    return checkpoint
