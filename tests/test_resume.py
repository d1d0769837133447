"""Never lose a run: SIGKILL mid-training, then --resume, ends with the same adapter as an
uninterrupted run; incomplete checkpoints are ignored; each step is logged once; a changed
recipe or data file is refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from peftcli.recipe_file import load_recipe
from peftcli.run_folder.layout import Layout, latest, state_file
from peftcli.run_folder.plan import differences
from peftcli.training.run import train

from .conftest import cli, write_recipe

STEPS, EVERY = 120, 20


def recipe_file(tmp_path: Path) -> Path:
    # LoRA dropout on: resuming must also restore the RNG that draws the dropout masks.
    return write_recipe(
        tmp_path / "r.yaml",
        peft={"dropout": 0.1},
        data={"eval": 0.0},
        training={
            "max_steps": STEPS,
            "batch_size": 4,
            "save_every": EVERY,
            "keep_checkpoints": 2,
            "log_every": 1,
            "lr": 1e-3,
            "output_dir": str(tmp_path / "run"),
        },
    )


def weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run / "adapter" / "adapter_model.safetensors")


def kill_after_first_checkpoint(recipe: Path, run: Path) -> int:
    """Start training in a subprocess and SIGKILL it once a checkpoint exists; returns the
    number of steps it had logged."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "peftcli.cli", "train", str(recipe)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ},
    )
    deadline = time.time() + 240
    while not (run / "checkpoints" / f"step-{EVERY}" / "state.json").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return len((run / "metrics.jsonl").read_text().splitlines())


def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, completion_data, capsys):
    recipe = recipe_file(tmp_path)
    run = tmp_path / "run"
    logged = kill_after_first_checkpoint(recipe, run)
    assert logged < STEPS and (run / ".incomplete").exists()

    # A checkpoint being written when the kill came, and one missing its state: both ignored.
    (run / "checkpoints" / ".step-999.tmp").mkdir()
    (run / "checkpoints" / "step-998" / "adapter").mkdir(parents=True)

    code, _, err = cli("train", str(recipe), capsys=capsys)
    assert code == 2 and "unfinished run" in err and "--resume" in err
    code, _, err = cli("train", str(recipe), "--resume", capsys=capsys)
    assert code == 0, err
    assert "resuming" in err and "step-" in err

    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), "each step logged exactly once"
    assert not (run / ".incomplete").exists()
    kept = sorted(p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith("."))
    assert len([k for k in kept if (run / "checkpoints" / k / "state.json").exists()]) <= 2

    reference = load_recipe(recipe, [f"training.output_dir={tmp_path / 'reference'}"])
    train(reference)
    ref_rows = [json.loads(x) for x in (tmp_path / "reference" / "metrics.jsonl").read_text().splitlines()]
    # float32: resuming from an exact checkpoint replays the same kernels on the same batches,
    # equal bit for bit (0 measured); the tolerances admit rounding-level noise only (1e-6 is
    # ~10 ulp of |w| < 0.15), while a lost optimizer moment or a skipped batch moves weights by
    # up to lr = 1e-3 per Adam step.
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in ref_rows], rel=1e-5)
    resumed, uninterrupted = weights(run), weights(tmp_path / "reference")
    # float32 weights: 1e-6, rounding-level only (as said above)
    for key in uninterrupted:
        assert torch.allclose(resumed[key], uninterrupted[key], atol=1e-6), key


def test_resume_refuses_a_changed_recipe_or_data(tmp_path, completion_data, capsys):
    recipe = recipe_file(tmp_path)
    run = tmp_path / "run"
    kill_after_first_checkpoint(recipe, run)
    code, _, err = cli("train", str(recipe), "--resume", "training.lr=5e-4", capsys=capsys)
    assert code == 2 and "training.lr: 0.001 -> 0.0005" in err
    with completion_data.open("a") as f:
        f.write(json.dumps({"prompt": "Uppercase: new\n", "completion": "NEW"}) + "\n")
    code, _, err = cli("train", str(recipe), "--resume", capsys=capsys)
    assert code == 2 and "data.train file changed" in err
    completion_data.write_text("".join(completion_data.read_text().splitlines(keepends=True)[:-1]))
    # A checkpoint of a peftcli that turned rows into other token ids is not resumed on today's;
    # one from before the fingerprint recorded the encoding encoded text as today.
    state = state_file(latest(Layout(run).checkpoints))
    saved = json.loads(state.read_text())
    saved["fingerprint"]["encoding"]["cache"] -= 1
    state.write_text(json.dumps(saved))
    code, _, err = cli("train", str(recipe), "--resume", capsys=capsys)
    assert code == 2 and "the data encoding changed with peftcli" in err
    del saved["fingerprint"]["encoding"]
    state.write_text(json.dumps(saved))
    # What does not change the math may change: logging cadence.
    code, _, err = cli("train", str(recipe), "--resume", "training.log_every=5", capsys=capsys)
    assert code == 0, err


def test_an_image_checkpoint_from_before_the_encoding_was_recorded_is_not_resumed():
    """Image+text checkpoints written before the fingerprint held the encoding were made without
    the processor's BOS (vision encoding 1): resuming them on today's ids is refused; text ones
    encoded as today and resume."""

    def fingerprint(task: str, encoding: dict | None) -> dict:
        recipe = {"model": {"task": task}}
        return {"recipe": recipe, "num_processes": 1} | ({"encoding": encoding} if encoding else {})

    today = {"cache": 2, "vision": 2}
    assert (
        differences(fingerprint("image_text_to_text", today), fingerprint("image_text_to_text", today)) == []
    )
    changes = differences(fingerprint("image_text_to_text", None), fingerprint("image_text_to_text", today))
    assert changes == [
        "the data encoding changed with peftcli: {'cache': 2, 'vision': 1} -> {'cache': 2, 'vision': 2} "
        "(the rows would become other token ids)"
    ]
    assert differences(fingerprint("causal_lm", None), fingerprint("causal_lm", {"cache": 2})) == []


def test_resume_of_a_finished_run_is_refused(tmp_path, completion_data, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", training={"max_steps": 2})
    assert cli("train", str(recipe), capsys=capsys)[0] == 0
    code, _, err = cli("train", str(recipe), "--resume", capsys=capsys)
    assert code == 2 and "finished run" in err
    code, _, err = cli("train", str(recipe), "--resume", "--overwrite", capsys=capsys)
    assert code == 2 and "contradict" in err


def test_non_finite_gradients_stop_the_run_and_name_the_last_checkpoint(tmp_path, completion_data, capsys):
    recipe = write_recipe(
        tmp_path / "r.yaml",
        data={"eval": 0.0},
        training={"max_steps": 30, "save_every": 2, "lr": 1e30, "max_grad_norm": 1.0},
    )
    code, _, err = cli("train", str(recipe), capsys=capsys)
    assert code == 2 and "training diverged at step" in err
    assert not (tmp_path / "run" / "adapter").exists(), "no broken adapter is written"


def test_adalora_resumes_after_its_ranks_are_pruned(tmp_path, completion_data, capsys):
    """AdaLoRA prunes ranks during training and PEFT saves the trimmed matrices; a checkpoint
    keeps the tensors as training holds them (and the rank pattern), so a run resumed after
    the final allocation ends with the uninterrupted run's adapter, bit for bit."""
    import shutil

    steps, every = 20, 15  # AdaLoRA's final allocation is at step 20 - 30% = 14
    recipe = write_recipe(
        tmp_path / "r.yaml",
        peft={"method": "adalora", "r": 8},
        data={"eval": 0.0},
        training={"max_steps": steps, "save_every": every, "lr": 0.03},
    )
    assert cli("train", str(recipe), capsys=capsys)[0] == 0
    run, again = tmp_path / "run", tmp_path / "again"
    # The same run, as if killed after its checkpoint: only what existed at step 15 is kept.
    again.mkdir()
    for name in (".peftcli", "recipe.yaml", "checkpoints"):
        copy = shutil.copytree if (run / name).is_dir() else shutil.copy
        copy(run / name, again / name)
    (again / ".incomplete").touch()
    code, _, err = cli("train", str(recipe), f"training.output_dir={again}", "--resume", capsys=capsys)
    assert code == 0, err
    assert f"from step-{every}" in err
    resumed, uninterrupted = weights(again), weights(run)
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
