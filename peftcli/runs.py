"""The run folder: what peftcli may write, replace or continue, and who is writing it.

Three rules keep a user's files safe:
- peftcli deletes only what it made. A folder it creates gets a marker file; `--overwrite`
  replaces only a peftcli run (finished, unfinished or stranded), never another folder, the
  working directory, or a folder that holds the recipe's own files.
- One writer per run. `train` holds a lock beside the run folder for its whole life; a second
  `train` of the same folder is refused naming the first. A lock whose holder died is stale
  (same host: the pid is gone or belongs to a younger process).
- Interrupted means resumable. An unfinished run (`.incomplete` inside) — fresh, resumed, or an
  `--overwrite` run still building in its hidden `.NAME.partial` twin — continues with
  `--resume`; an overwriting run's checkpoints are never thrown away without being asked.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftcli import outputs
from peftcli.errors import UserError
from peftcli.home import proc_stat, process_alive
from peftcli.recipe import Recipe

MARKER = outputs.MARKER  # {"kind": "run"}; runs made before it carry outputs.LEGACY_RUN_MARKER
INCOMPLETE = ".incomplete"
# What a run folder made by an older peftcli (without MARKER) may contain: recognised as a run
# only when it holds recipe.yaml, something only training writes, and nothing else.
TRAINED_ENTRIES = {INCOMPLETE, "adapter", "metrics.jsonl", "checkpoints"}
RUN_ENTRIES = {
    MARKER,
    outputs.LEGACY_RUN_MARKER,
    INCOMPLETE,
    "recipe.yaml",
    "adapter",
    "metrics.jsonl",
    "eval.json",
    "loss.png",
    "checkpoints",
}


def partial_of(run_dir: Path) -> Path:
    """Where an `--overwrite` run builds before it replaces `run_dir`."""
    return run_dir.with_name(f".{run_dir.name}.partial")


def lock_of(run_dir: Path) -> Path:
    """The lock sits beside the run, so it covers the run and its `.partial` twin alike."""
    return run_dir.with_name(f".{run_dir.name}.lock")


def is_run(path: Path) -> bool:
    """A folder peftcli made for a run (by its marker; older runs by their contents)."""
    if not path.is_dir():
        return False
    if (kind := outputs.kind_of(path)) is not None:
        return kind == "run"
    names = {p.name for p in path.iterdir()}
    return "recipe.yaml" in names and bool(names & TRAINED_ENTRIES) and names <= RUN_ENTRIES


def is_unfinished(path: Path) -> bool:
    return (path / INCOMPLETE).exists()


def has_checkpoints(path: Path) -> bool:
    from peftcli.training.checkpoint import latest

    return latest(path / "checkpoints") is not None


def recipe_files(recipe: Recipe) -> list[Path]:
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


def plan(run_dir: Path, overwrite: bool, resume: bool, protected: list[Path] = ()) -> Plan:
    """Decide where a `train` writes; refuse what would destroy or mix anything. Reads only."""
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other", "pick one")
    check_location(run_dir, list(protected))
    partial = partial_of(run_dir)
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


def create(work_dir: Path) -> None:
    """Make the run folder (marked as peftcli's) and flag it unfinished until training ends."""
    work_dir.mkdir(parents=True, exist_ok=True)
    outputs.mark(work_dir, "run")
    (work_dir / INCOMPLETE).touch()


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
    from peftcli.training.checkpoint import read_state
    from peftcli.training.tracking import keep_metrics_until

    if not plan_.continuing:
        discard_partial(plan_)
        writable(plan_.work_dir.parent)
        create(plan_.work_dir)
    (plan_.work_dir / "recipe.yaml").write_text(recipe_yaml, encoding="utf-8")
    keep_metrics_until(plan_.work_dir / "metrics.jsonl", read_state(start)["step"] if start else 0)


def forget(plan_: Plan) -> None:
    """Leave the folder as the run found it: removed if the run made it, else empty again."""
    if plan_.creates:
        shutil.rmtree(plan_.work_dir, ignore_errors=True)
        return
    for child in plan_.work_dir.iterdir() if plan_.work_dir.is_dir() else []:
        shutil.rmtree(child) if child.is_dir() else child.unlink()


def finish(plan_: Plan) -> None:
    """Training ended: the run is complete; an --overwrite run replaces the old one now."""
    (plan_.work_dir / INCOMPLETE).unlink(missing_ok=True)
    outputs.follow_umask(plan_.work_dir)  # checkpoints and reference written before this one
    if plan_.work_dir == plan_.run_dir:
        return
    outputs.swap_in(plan_.work_dir, plan_.run_dir)


# --------------------------------------------------------------------------- one writer


def _start_ticks(pid: int) -> int | None:
    """The process's start time (Linux clock ticks since boot): tells a pid from its reuse."""
    fields = proc_stat(pid)
    return int(fields[19]) if fields and len(fields) > 19 else None


def _alive(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname():
        return True  # cannot tell from here: assume it runs
    pid = int(holder.get("pid", -1))
    if not process_alive(pid):
        return False
    ticks = _start_ticks(pid)
    return ticks is None or holder.get("start") in (None, ticks)


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def holder_line(holder: dict, lock: Path) -> str:
    return (
        f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}"
        f" (lock {lock})"
    )


def check_free(run_dir: Path) -> None:
    """Refuse if a live process holds the run (read-only; the launcher checks before starting)."""
    lock = lock_of(run_dir)
    holder = _read(lock)
    if holder and _alive(holder):
        raise _busy(run_dir, holder, lock)


def _busy(run_dir: Path, holder: dict, lock: Path) -> UserError:
    return UserError(
        f"{run_dir} is being trained by another peftcli: {holder_line(holder, lock)}",
        "wait for it to finish or stop it; if that process is gone, delete the lock file",
    )


class RunLock:
    """`train`'s claim on a run folder, from before the folder is touched until the process ends."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.path = lock_of(run_dir)
        self.held = False

    def acquire(self) -> RunLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _unwritable(self.run_dir, exc) from None
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "start": _start_ticks(os.getpid()),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(me) + "\n", encoding="utf-8")
            for _ in range(3):
                try:
                    os.link(tmp, self.path)  # atomic: fails if any lock exists
                    self.held = True
                    return self
                except FileExistsError:
                    holder = _read(self.path)
                    if holder is None:
                        continue  # released meanwhile
                    if holder == {} and time.time() - self._mtime() < 5:
                        time.sleep(0.2)  # being written right now
                        continue
                    if holder and _alive(holder):
                        raise _busy(self.run_dir, holder, self.path) from None
                    self.path.unlink(missing_ok=True)  # stale: its holder died
        except OSError as exc:
            raise _unwritable(self.run_dir, exc) from None
        finally:
            tmp.unlink(missing_ok=True)
        raise UserError(f"could not take the lock {self.path}", "try again")

    def _mtime(self) -> float:
        try:
            return self.path.stat().st_mtime
        except OSError:
            return 0.0

    def release(self) -> None:
        if self.held:
            holder = _read(self.path)
            if holder and holder.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False


def _unwritable(run_dir: Path, exc: OSError) -> UserError:
    return UserError(
        f"training.output_dir: cannot write {run_dir}: {exc.strerror or exc}",
        "choose a folder you can write to",
    )


def writable(path: Path) -> None:
    """Turn an OSError making `path` into the one-line error a user can act on."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _unwritable(path, exc) from None


# --------------------------------------------------------------------------- what a run leaves

LABELS_FILE = "labels.json"


def save_adapter(
    peft_model: Any, tokenizer: Any, labels: list[str] | None, folder: Path, state: dict | None = None
) -> None:
    """`state`: the adapter's tensors gathered whole, where the model is sharded (FSDP)."""
    from peftcli.methods.inits import save_pretrained

    save_pretrained(peft_model, folder, state)  # PiSSA/OLoRA: converted for the original base
    tokenizer.save_pretrained(folder)
    if labels:  # class names, in the order of the classifier's outputs
        (folder / LABELS_FILE).write_text(json.dumps(labels) + "\n", encoding="utf-8")
    outputs.follow_umask(folder)  # safetensors writes its files 0600


def write_json(path: Path, obj: Any) -> None:
    outputs.write_text(path, json.dumps(obj, indent=2) + "\n")


def update_results(run_dir: Path | None, change: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """A later evaluation's results into a run's eval.json (`change(previous) -> new`), written
    whole, and its model card with them; only in a folder peftcli made for a run."""
    if run_dir is None or not is_run(run_dir):
        return
    eval_file = run_dir / "eval.json"
    previous = json.loads(eval_file.read_text()) if eval_file.is_file() else {}
    write_json(eval_file, change(previous))
    from peftcli.cards import write_run_card

    write_run_card(run_dir)
