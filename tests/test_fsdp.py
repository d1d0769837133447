"""FSDP2 sharding, tested on the CPU (gloo) with configs/fsdp-cpu.yaml: each process holds its
half of the base (measured from the DTensor shards), the adapter is gathered whole on save and
loads with plain PEFT, 2 sharded processes train what 1 process trains (LoRA in float64, QLoRA in
float32: bitsandbytes quantizes only 16/32-bit weights), a SIGKILLed sharded run resumes from its
sharded checkpoint to the same adapter, and a launch config whose sharding is not set up is
refused rather than run unsharded."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from .conftest import PEFTCLI_SCRIPT, ROOT, cli, run_cli, write_recipe
from .test_distributed import adapter

FSDP_CPU = str(ROOT / "configs" / "fsdp-cpu.yaml")
STEPS, EVERY = 12, 4  # 58 train rows, global batch 8: the run crosses an uneven epoch's end


def rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def train_losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in rows(run) if "loss" in r]


def recipes(tmp_path: Path, **sections) -> tuple[Path, Path]:
    """The same training as 1 process × batch 8 and as 2 processes × batch 4."""
    common = {"data": {"eval": 0.1}, "peft": {"dropout": 0.0}, "eval": {"metrics": ["loss"]}}
    common.update(sections)
    made = []
    for name, batch in (("one", 8), ("two", 4)):
        training = {
            "max_steps": STEPS,
            "batch_size": batch,
            "mixed_precision": "no",
            "save_every": EVERY,
            "keep_checkpoints": 1,
            "output_dir": str(tmp_path / name),
        }
        made.append(write_recipe(tmp_path / f"{name}.yaml", **{**common, "training": training}))
    return made[0], made[1]


def check_sharded(run: Path) -> dict:
    """The run says how it ran, and each process held at most 0.6 of the model's parameter
    bytes: half of every sharded tensor (FSDP pads a shard to equal rows, a few bytes) plus
    nothing replicated, since every module of tiny-llama sits in an FSDP unit."""
    how = json.loads((run / "eval.json").read_text())["train"]["distributed"]
    assert how["processes"] == 2 and how["type"] == "FSDP2" and how["sharding"] == "FULL_SHARD", how
    assert how["mixed_precision"] == "no" and len(how["devices"]) == 2
    assert how["param_bytes_per_process"] <= 0.6 * how["param_bytes"], how
    return how


def kill_everything_after(proc: subprocess.Popen, checkpoint: Path) -> None:
    """SIGKILL the launching peftcli, Accelerate's launcher and every training process at once,
    as a lost machine would, once `checkpoint` is complete."""
    from .test_faults import family as descendants

    deadline = time.time() + 240
    while not (checkpoint / "state.json").exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    family = descendants(proc.pid)
    for pid in family:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    # Gone, not dying: the run's lock names rank 0, and a lock is stale once its holder is gone.
    while any(Path(f"/proc/{pid}").exists() for pid in family):
        assert time.time() < deadline, "killed processes did not go away"
        time.sleep(0.05)


def test_fsdp_lora_shards_the_base_equals_one_process_and_resumes_after_sigkill(
    tmp_path, completion_data, capsys
):
    """LoRA in float64: 2 FSDP processes × batch 4, SIGKILLed after a checkpoint and resumed,
    equal 1 process × batch 8 (uninterrupted) at every step."""
    from .test_train import EXACT

    one, two = recipes(tmp_path, model={"dtype": "float64"})
    assert cli("train", str(one), capsys=capsys)[0] == 0
    run = tmp_path / "two"
    proc = subprocess.Popen(
        [str(PEFTCLI_SCRIPT), "train", str(two), "--launch-config", FSDP_CPU],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    kill_everything_after(proc, run / "checkpoints" / f"step-{EVERY}")
    assert (run / ".incomplete").exists(), "killed before it finished"
    kept = sorted(p.name for p in (run / "checkpoints").iterdir() if (p / "state.json").exists())
    assert len(kept) == 1, kept  # keep_checkpoints: 1
    # The checkpoint is sharded: each process wrote its own slice of the optimizer state.
    assert {p.name for p in (run / "checkpoints" / kept[0]).glob("optimizer*")} == {
        "optimizer-0.pt",
        "optimizer-1.pt",
    }

    done = run_cli("train", str(two), "--launch-config", FSDP_CPU, "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming {run} from step-" in done.stderr
    assert "running on 2 processes, FSDP2 FULL_SHARD, mixed precision no" in done.stderr
    how = check_sharded(run)
    # `peftcli estimate --num-processes 2` planned what each process held: half the base and the
    # adapter (FSDP shards trainable parameters too), plus buffers and FSDP's padding (< 1%).
    from peftcli.commands.estimate import estimate
    from peftcli.recipe_file import load_recipe

    plan = estimate(load_recipe(two), num_processes=2)["fsdp"]
    planned = plan["weights_bytes"] + plan["adapter_bytes"]
    # Byte counts, not floats: the plan leaves out only buffers and shard padding (< 1%).
    assert planned == pytest.approx(how["param_bytes_per_process"], rel=0.01), (plan, how)
    # Each step logged once; the same loss at every step up to metrics.jsonl's 6 decimals (float64
    # sums in another order differ by ~1e-15, yet may round to neighbours 1e-6 apart: 2e-6).
    mine, theirs = train_losses(run), train_losses(tmp_path / "one")
    assert [s for s, _ in mine] == list(range(1, STEPS + 1)) == [s for s, _ in theirs]
    assert [x for _, x in mine] == pytest.approx([x for _, x in theirs], abs=2e-6)
    # The adapter, gathered whole from the shards: the 1-process adapter's keys, values to EXACT.
    a, b = adapter(tmp_path / "one"), adapter(run)
    assert a.keys() == b.keys()
    # float64: EXACT's reason is at its definition (test_train.py)
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=0, atol=EXACT), (key, (a[key] - b[key]).abs().max())
    # The same adapter config (PEFT writes target_modules from a set: compared as one).
    configs = [
        json.loads((r / "adapter" / "adapter_config.json").read_text()) for r in (tmp_path / "one", run)
    ]
    for config in configs:
        config["target_modules"] = sorted(config["target_modules"])
    assert configs[0] == configs[1]


def test_fsdp_qlora_shards_the_4bit_base_equals_one_process_and_merges(tmp_path, completion_data, capsys):
    """QLoRA: the 4-bit weights are stored in float32 (bnb_4bit_quant_storage), so FSDP shards them
    like any float tensor; 2 sharded processes train what 1 process trains; the run merges."""
    one, two = recipes(tmp_path, peft={"method": "qlora", "dropout": 0.0}, model={"dtype": "float32"})
    assert cli("train", str(one), capsys=capsys)[0] == 0
    done = run_cli("train", str(two), "--launch-config", FSDP_CPU)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "two"
    how = check_sharded(run)
    whole = json.loads((tmp_path / "one" / "eval.json").read_text())["train"]["distributed"]
    assert whole["param_bytes"] == how["param_bytes"] == whole["param_bytes_per_process"]

    # float32: a sum split across processes rounds differently, ~1e-7 relative per term; over a
    # few hundred tokens the mean loss moves by < 1e-6, below metrics.jsonl's 6-decimal rounding
    # (1e-6 between neighbours): 3e-6 holds both, with room for 12 steps of Adam drift.
    mine, theirs = train_losses(run), train_losses(tmp_path / "one")
    assert [s for s, _ in mine] == [s for s, _ in theirs]
    assert [x for _, x in mine] == pytest.approx([x for _, x in theirs], abs=3e-6)
    # Adam divides each gradient by its running RMS, so a ~1e-6 relative gradient error gives
    # a ~1e-6 relative update error: ~lr · steps · 1e-6 ≈ 4e-8 per weight. Only elements whose
    # gradient is itself at rounding level (cancelling sums) can flip sign and move by up to lr
    # per step. So: the mean difference stays at the rounding level (a real difference in the
    # math, such as one repeated example, moves weights by ~1e-4 on average), and no element
    # differs by more than Adam can move it in these steps.
    a, b = adapter(tmp_path / "one"), adapter(run)
    assert a.keys() == b.keys()
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    lr = 3e-3
    assert diff.mean() < 1e-6 and diff.max() < 2 * lr * STEPS, (diff.mean(), diff.max())

    code, _, err = cli("merge", str(run), "-o", str(tmp_path / "merged"), capsys=capsys)
    assert code == 0, err
    assert "dequantized" in err and (tmp_path / "merged" / "model.safetensors").is_file()


def test_a_launch_config_whose_sharding_is_not_set_up_is_refused(monkeypatch):
    """Accelerate turns an FSDP or DeepSpeed config into plain data parallelism, silently, where it
    cannot set it up (DeepSpeed on CPU, FSDP1 without GPUs): peftcli refuses instead."""
    from types import SimpleNamespace

    from peftcli.errors import UserError
    from peftcli.training.accelerator import check_distribution, shard_on_cpu

    ddp = SimpleNamespace(distributed_type=SimpleNamespace(value="MULTI_CPU"))
    check_distribution(ddp)  # nothing asked: nothing to refuse
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(UserError, match="asks for DEEPSPEED, but Accelerate set up MULTI_CPU"):
        check_distribution(ddp)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(UserError, match="asks for FSDP"):
        check_distribution(ddp)
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(UserError, match="fsdp_version: 1 runs on GPUs only"):
        shard_on_cpu(ddp, "no")


def test_launch_configs_that_cannot_run_here_are_refused_before_any_process_starts(
    tmp_path, completion_data, capsys
):
    """One line, exit 2, nothing launched: DeepSpeed without GPUs or deepspeed, FSDP1 without
    GPUs, an 8-bit base under FSDP, and a 4-bit base whose stored dtype FSDP's mixed precision
    would cast."""
    import importlib.util

    import yaml

    recipe = write_recipe(tmp_path / "r.yaml")
    refused = []
    if not (torch.cuda.is_available() and importlib.util.find_spec("deepspeed")):
        refused.append(([str(ROOT / "configs" / "deepspeed-zero2.yaml")], "DeepSpeed needs CUDA GPUs"))
    if not torch.cuda.is_available():
        fsdp1 = yaml.safe_load((ROOT / "configs" / "fsdp-cpu.yaml").read_text())
        fsdp1["fsdp_config"]["fsdp_version"] = 1
        (tmp_path / "fsdp1.yaml").write_text(yaml.safe_dump(fsdp1))
        refused.append(([str(tmp_path / "fsdp1.yaml")], "fsdp_version 1 runs on GPUs only"))
    qlora = ["peft.method=qlora", "model.dtype=float32", "training.mixed_precision=bf16"]
    refused.append(([FSDP_CPU, *qlora], "with a 4-bit base under FSDP needs model.dtype: bfloat16"))
    refused.append(([FSDP_CPU, "model.quantization=8bit"], "8bit cannot be sharded by FSDP"))
    refused.append(([FSDP_CPU, "peft.method=prompt-tuning"], "prompt-tuning does not train under FSDP"))
    for (config, *overrides), expected in refused:
        code, _, err = cli("train", str(recipe), *overrides, "--launch-config", config, capsys=capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and expected in lines[0], err
        assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_fsdp_qlora_resumes_after_sigkill_to_the_uninterrupted_sharded_run(tmp_path, completion_data):
    """QLoRA under FSDP2, SIGKILLed after a sharded checkpoint and resumed, against the same
    sharded run uninterrupted: the same operations in the same order, so the same bits."""
    _, two = recipes(tmp_path, peft={"method": "qlora", "dropout": 0.1}, model={"dtype": "float32"})
    run = tmp_path / "two"
    proc = subprocess.Popen(
        [str(PEFTCLI_SCRIPT), "train", str(two), "--launch-config", FSDP_CPU],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    kill_everything_after(proc, run / "checkpoints" / f"step-{EVERY}")
    assert (run / ".incomplete").exists(), "killed before it finished"
    done = run_cli("train", str(two), "--launch-config", FSDP_CPU, "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    reference = tmp_path / "reference"
    again = run_cli("train", str(two), f"training.output_dir={reference}", "--launch-config", FSDP_CPU)
    assert again.returncode == 0, again.stderr[-3000:]
    assert train_losses(run) == train_losses(reference)
    mine, theirs = adapter(run), adapter(reference)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
