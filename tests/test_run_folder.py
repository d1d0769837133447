"""The run folder, as a user meets it, through the installed console script in fresh processes:
peftcli deletes only what it made, one `train` writes a run at a time, and any interrupted
run — fresh, resumed or overwriting — continues with `--resume` to the same adapter as an
uninterrupted run."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from .conftest import PEFTCLI_SCRIPT, ROOT, one_error_line, run_cli, write_recipe


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, byte for byte (and every folder, as empty content)."""
    return {
        str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else b"<dir>")
        for p in sorted(folder.rglob("*"))
    }


@pytest.fixture
def recipe(tmp_path, completion_data) -> Path:
    return write_recipe(tmp_path / "r.yaml", data={"train": str(completion_data), "eval": 0.0})


# --------------------------------------------------------------------------- refusals


def case_data_folder(tmp: Path) -> tuple[list[str], Path, str]:
    """--overwrite pointed at the user's data folder: refused, the folder untouched."""
    folder = tmp / "mydata"
    folder.mkdir()
    shutil.copy(tmp / "train.jsonl", folder / "train.jsonl")
    (folder / "notes.txt").write_text("my notes\n")
    args = [f"training.output_dir={folder}", f"data.train={folder / 'train.jsonl'}", "--overwrite"]
    return args, folder, "which this recipe reads"


def case_other_folder(tmp: Path) -> tuple[list[str], Path, str]:
    folder = tmp / "other"
    folder.mkdir()
    (folder / "a.txt").write_text("x\n")
    return [f"training.output_dir={folder}", "--overwrite"], folder, "is not a peftcli run folder"


def case_not_a_run_without_overwrite(tmp: Path) -> tuple[list[str], Path, str]:
    folder = tmp / "other"
    folder.mkdir()
    (folder / "recipe.yaml").write_text("mine\n")
    return [f"training.output_dir={folder}"], folder, "is not a peftcli run folder"


def case_working_directory(tmp: Path) -> tuple[list[str], Path, str]:
    return ["training.output_dir=.", "--overwrite"], tmp, "working directory"


def case_file(tmp: Path) -> tuple[list[str], Path, str]:
    (tmp / "afile").write_text("x\n")
    return ["training.output_dir=afile"], tmp, "afile is a file, not a folder"


def case_under_a_file(tmp: Path) -> tuple[list[str], Path, str]:
    (tmp / "afile").write_text("x\n")
    return ["training.output_dir=afile/run"], tmp, "afile is a file, not a folder"


def case_inside_a_run(tmp: Path) -> tuple[list[str], Path, str]:
    run = tmp / "run"
    (run / "adapter").mkdir(parents=True)
    (run / ".peftcli-run").write_text("{}\n")
    return [f"training.output_dir={run / 'adapter' / 'x'}"], tmp, "is inside the peftcli run"


def case_resume_nothing(tmp: Path) -> tuple[list[str], Path, str]:
    return ["--resume"], tmp, "holds no run; there is nothing to resume"


def case_resume_and_overwrite(tmp: Path) -> tuple[list[str], Path, str]:
    return ["--resume", "--overwrite"], tmp, "contradict"


def case_home_is_a_file(tmp: Path) -> tuple[list[str], Path, str]:
    (tmp / "home").write_text("x\n")
    return ["env:PEFTCLI_HOME=" + str(tmp / "home")], tmp, "PEFTCLI_HOME"


def case_home_unwritable(tmp: Path) -> tuple[list[str], Path, str]:
    # /proc refuses new entries even to root (the suite runs as root in CI).
    return ["env:PEFTCLI_HOME=/proc/1/peftcli"], tmp, "PEFTCLI_HOME /proc/1/peftcli is not writable"


def case_seed(tmp: Path) -> tuple[list[str], Path, str]:
    return ["training.seed=-1"], tmp, "training.seed"


def case_broken_weights(tmp: Path) -> tuple[list[str], Path, str]:
    """A failure after the checks (the weights do not load): nothing is left behind."""
    from peftcli.model.builtin import materialise

    model = tmp / "model"
    shutil.copytree(materialise("tiny-llama"), model)
    (model / "model.safetensors").write_bytes(b"not safetensors")
    return [f"model.name_or_path={model}"], tmp, "cannot load the weights"


REFUSALS = [
    case_data_folder,
    case_other_folder,
    case_not_a_run_without_overwrite,
    case_working_directory,
    case_file,
    case_under_a_file,
    case_inside_a_run,
    case_resume_nothing,
    case_resume_and_overwrite,
    case_home_is_a_file,
    case_home_unwritable,
    case_seed,
    case_broken_weights,
]


@pytest.mark.parametrize("case", REFUSALS, ids=[c.__name__[5:] for c in REFUSALS])
def test_refused_with_one_line_and_nothing_touched(tmp_path, recipe, case):
    args, watched, expected = case(tmp_path)
    env = dict(a[4:].split("=", 1) for a in args if a.startswith("env:"))
    args = [a for a in args if not a.startswith("env:")]
    before = snapshot(watched)
    proc = run_cli("train", str(recipe), *args, cwd=tmp_path, env=env)
    assert expected in one_error_line(proc)
    assert snapshot(watched) == before
    assert not (tmp_path / "run").exists() or case is case_inside_a_run
    assert not list(tmp_path.glob(".*.lock")), "the lock is released"


# --------------------------------------------------------------------------- interrupts


def start(recipe: Path, *args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [str(PEFTCLI_SCRIPT), "train", str(recipe), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        cwd=cwd,
        env={**os.environ},
    )


def interrupt_at(proc: subprocess.Popen, step: int, total: int, sig: int = signal.SIGINT) -> str:
    """Send `sig` once the run logs `step`; returns all it wrote to stderr."""
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if line.startswith(f"step {step}/{total} "):
            proc.send_signal(sig)
            break
    seen.append(proc.stderr.read())
    proc.wait(timeout=300)
    return "".join(seen)


def adapter(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "adapter" / "adapter_model.safetensors")


STEPS = 40
COMMON = [f"training.max_steps={STEPS}", "training.save_every=5", "training.log_every=1", "peft.dropout=0.1"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The uninterrupted run every interrupted one must reproduce."""
    tmp = tmp_path_factory.mktemp("reference")
    lines = (ROOT / "data" / "quickstart" / "train.jsonl").read_text().splitlines()[:64]
    (tmp / "train.jsonl").write_text("\n".join(lines) + "\n")
    recipe = write_recipe(tmp / "r.yaml", data={"train": str(tmp / "train.jsonl"), "eval": 0.0})
    proc = run_cli("train", str(recipe), *COMMON, cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return adapter(tmp / "run")


def assert_same(run: Path, reference: dict, note: str) -> None:
    import torch

    # The same kernels in the same order on the same machine (one thread per process): a resumed
    # run restores every state exactly, so the weights are bitwise those of the reference.
    mine = adapter(run)
    assert mine.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(mine[key], value), f"{note}: {key} {(mine[key] - value).abs().max()}"


def test_concurrent_runs_and_interrupts_resume_to_the_uninterrupted_adapter(
    tmp_path, completion_data, reference
):
    import json

    recipe = write_recipe(tmp_path / "r.yaml", data={"train": str(completion_data), "eval": 0.0})
    run = tmp_path / "run"
    rng = random.Random()
    first = rng.randrange(2, 10)

    # A fresh run; while it trains, a second `train` of the same folder is refused, naming it.
    a = start(recipe, *COMMON, cwd=tmp_path)
    for line in a.stderr:
        if line.startswith("step 1/"):
            break
    a.send_signal(signal.SIGSTOP)  # holds its lock, alive, while the others try
    try:
        for flags in ([], ["--overwrite"], ["--resume"]):
            other = run_cli("train", str(recipe), *COMMON, *flags, cwd=tmp_path)
            assert f"pid {a.pid}" in one_error_line(other), flags
    finally:
        a.send_signal(signal.SIGCONT)
    said = interrupt_at(a, first, STEPS)
    assert a.returncode == 130, said[-3000:]
    last = said.strip().splitlines()[-1]
    assert last.startswith("error: interrupted at step ") and "--resume" in last, last
    assert "Traceback" not in said
    assert (run / ".incomplete").exists() and not (run / "adapter").exists()

    # A torn last line (a kill while writing) is repaired on resume; each step is logged once.
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 99, "lo')
    # The resumed run is interrupted again, by SIGTERM this time (exit 143), then finishes.
    stopped = int(last.split("interrupted at step ")[1].split(";")[0])
    # A few steps after the first stop, far enough from the end that the signal lands in time.
    second = rng.randrange(stopped + 1, stopped + 6)
    assert second <= STEPS - 10, f"the first interrupt landed late, at step {stopped}"
    note = f"interrupted at steps {stopped} and {second}"
    b = start(recipe, *COMMON, "--resume", cwd=tmp_path)
    said = interrupt_at(b, second, STEPS, signal.SIGTERM)
    assert b.returncode == 143, said[-3000:]
    done = run_cli("train", str(recipe), *COMMON, "--resume", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))
    assert_same(run, reference, note)

    # An --overwrite run interrupted: the finished run stays as it was, the new one is kept
    # (not thrown away by another --overwrite), and --resume completes it in place of the old.
    finished = snapshot(run)
    c = start(recipe, *COMMON, "--overwrite", cwd=tmp_path)
    said = interrupt_at(c, first, STEPS)
    assert c.returncode == 130, said[-3000:]
    assert snapshot(run) == finished
    refused = run_cli("train", str(recipe), *COMMON, "--overwrite", cwd=tmp_path)
    assert "--resume" in one_error_line(refused)
    done = run_cli("train", str(recipe), *COMMON, "--resume", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (tmp_path / ".run.partial").exists() and not (run / ".incomplete").exists()
    assert_same(run, reference, note + " (overwriting run)")
    assert not list(tmp_path.glob(".*.lock"))
