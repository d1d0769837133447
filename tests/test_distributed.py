"""Scale out with Accelerate: a 2-process CPU run (gloo) equals a 1-process run with the same
global batch, logging happens once, and every shipped launch config names real options."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from .conftest import ROOT, cli, write_recipe

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def adapter(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run / "adapter" / "adapter_model.safetensors")


def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path, completion_data, capsys):
    """2 processes × 4 == 1 process × 8 at every step, across an epoch's end whose last global
    batch is uneven: the examples Accelerate repeats to even out the processes carry no loss."""
    from .test_train import EXACT

    common = {"model": {"dtype": "float64"}, "data": {"eval": 0.1}, "peft": {"dropout": 0.0}}
    one = write_recipe(
        tmp_path / "one.yaml",
        **common,
        training={
            "max_steps": 10,
            "batch_size": 8,
            "mixed_precision": "no",
            "output_dir": str(tmp_path / "one"),
        },
    )
    two = write_recipe(
        tmp_path / "two.yaml",
        **common,
        training={
            "max_steps": 10,
            "batch_size": 4,
            "mixed_precision": "no",
            "output_dir": str(tmp_path / "two"),
        },
    )
    assert cli("train", str(one), capsys=capsys)[0] == 0
    code, _, err = cli("train", str(two), "--num-processes", "2", capsys=capsys)
    assert code == 0, err
    rows = {
        name: [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        for name in ("one", "two")
    }
    examples = json.loads((tmp_path / "one" / "eval.json").read_text())["train"]
    assert rows["one"][-1]["epoch"] > 1, "the run crosses an epoch's end"
    assert [r["step"] for r in rows["two"]] == [r["step"] for r in rows["one"]], "the main process logs once"
    # Metrics are reduced across processes: the 2-process run reports the global loss, the same
    # at every step up to metrics.jsonl's 6 decimals (float64 losses ~1e-15 apart can round to
    # neighbours 1e-6 apart: 2e-6); the same tokens are counted.
    for a, b in zip(rows["one"], rows["two"], strict=True):
        assert a.get("loss", a.get("eval_loss")) == pytest.approx(b.get("loss", b.get("eval_loss")), abs=2e-6)
        assert a.get("tokens") == b.get("tokens")
    a, b = adapter(tmp_path / "one"), adapter(tmp_path / "two")
    # float64 weights: EXACT's reason is at its definition (test_train.py)
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=0, atol=EXACT), (key, (a[key] - b[key]).abs().max())
    evals = [json.loads((tmp_path / n / "eval.json").read_text()) for n in ("one", "two")]
    # float64 eval loss of weights equal to EXACT, summed over processes in another order:
    # ~1e-15 relative (0 measured); 1e-9 is margin, not a tuned number.
    assert evals[0]["loss"] == pytest.approx(evals[1]["loss"], rel=1e-9)
    assert evals[1]["examples"] == evals[0]["examples"], "no eval example counted twice"
    assert evals[1]["train"]["supervised_tokens"] == examples["supervised_tokens"]


def test_launch_refuses_before_starting_processes(tmp_path, completion_data, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", training={"lrr": 1})
    code, _, err = cli("train", str(recipe), "--num-processes", "2", capsys=capsys)
    assert code == 2 and "training.lrr" in err and "launching" not in err
    code, _, err = cli(
        "train", str(write_recipe(tmp_path / "ok.yaml")), "--launch-config", "nope.yaml", capsys=capsys
    )
    assert code == 2 and "--launch-config: file not found" in err


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_launch_configs_name_real_accelerate_options(path):
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import launch_command_parser

    text = path.read_text()
    assert text.startswith("#") and "peftcli train" in text, "configs start with the command that uses them"
    ClusterConfig.from_yaml_file(str(path))  # raises on unknown top-level keys
    options = {a.dest for a in launch_command_parser()._actions}
    raw = yaml.safe_load(text)
    for key in raw.get("fsdp_config") or {}:
        assert key in options, f"{path.name}: fsdp_config.{key} is not an Accelerate option"
    for key in raw.get("deepspeed_config") or {}:
        assert key in options, f"{path.name}: deepspeed_config.{key} is not an Accelerate option"


@pytest.mark.slow  # 70 s; `make test-all` (single-process interrupts: test_run_folder)
def test_ctrl_c_stops_every_process_at_a_checkpoint_and_resume_continues(tmp_path, completion_data):
    """Ctrl-C on `train --num-processes 2`: the training processes finish their step and write a
    checkpoint, the launching peftcli says once how to continue (with --num-processes), and the
    resumed run ends with the uninterrupted run's adapter."""
    import random
    import signal
    import subprocess

    from .conftest import PEFTCLI_SCRIPT, run_cli
    from .test_run_folder import adapter

    steps = 30
    common = [f"training.max_steps={steps}", "training.save_every=10", "training.log_every=1"]
    recipe = write_recipe(tmp_path / "r.yaml", data={"eval": 0.0}, training={"batch_size": 4})
    stop_at = random.randrange(3, 12)
    proc = subprocess.Popen(
        [str(PEFTCLI_SCRIPT), "train", str(recipe), *common, "--num-processes", "2"],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if line.startswith(f"step {stop_at}/"):
            proc.send_signal(signal.SIGINT)
            break
    said = "".join(seen) + proc.stderr.read()
    assert proc.wait(timeout=300) == 130, said[-3000:]
    errors = [line for line in said.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and said.strip().splitlines()[-1] == errors[0], said[-3000:]
    assert "--num-processes 2 --resume" in errors[0] and "checkpoints/step-" in errors[0]
    assert "Traceback" not in said

    done = run_cli("train", str(recipe), *common, "--num-processes", "2", "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    reference = run_cli(
        "train", str(recipe), *common, "--num-processes", "2", f"training.output_dir={tmp_path / 'reference'}"
    )
    assert reference.returncode == 0, reference.stderr[-3000:]
    mine, theirs = adapter(tmp_path / "run"), adapter(tmp_path / "reference")
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs), f"stopped at step {stop_at}"
