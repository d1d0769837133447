"""The training benchmark's harness (bench/): its workload, FLOP count, report and GPU guard.

The full benchmark is `make bench`; the end-to-end smoke run of all three trainers is marked
slow (`make test-all`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import bench_train  # noqa: E402
import bench_workload as work  # noqa: E402

TINY = work.Shape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=176, vocab=1024)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    work.build_tokenizer(folder, vocab=1024)
    return folder


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return work.build_tokenizer(tokenizer_dir)  # loads the saved one


def test_data_is_mixed_length_within_bounds(tokenizer, tmp_path):
    stats = work.write_data(tmp_path / "train.jsonl", work.DataSpec(examples=200, max_len=256), tokenizer)
    rows = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert len(rows) == stats["examples"] == 200
    assert set(rows[0]) == {"prompt", "completion"} and rows[0]["prompt"].endswith(work.PROMPT_TAIL)
    assert 16 <= stats["min"] and stats["max"] <= 256
    # Long-tailed: the mean above the median, a tail well beyond it.
    assert stats["median"] < stats["mean"] and stats["p90"] > 2 * stats["median"]
    assert 0.2 < stats["supervised_tokens"] / stats["tokens"] < 0.8
    again = work.write_data(tmp_path / "again.jsonl", work.DataSpec(examples=200, max_len=256), tokenizer)
    assert (
        again == stats and (tmp_path / "again.jsonl").read_bytes() == (tmp_path / "train.jsonl").read_bytes()
    )
    fixed = work.write_data(tmp_path / "fixed.jsonl", work.DataSpec(examples=8, fixed=60), tokenizer)
    assert 58 <= fixed["min"] and fixed["max"] <= 64


def test_parameter_counts_match_the_real_model(tokenizer_dir, tmp_path):
    from bench_trainers import lora_config
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    folder = work.build_model(tmp_path / "m", TINY, tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.num_parameters() == work.total_params(TINY)
    peft_model = get_peft_model(model, lora_config({"r": 8, "alpha": 16}))
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert trainable == work.lora_params(TINY, 8)
    assert work.flops_per_token(TINY, 8) == 4 * work.linear_params(TINY) + 6 * trainable


def result(
    trainer: str, packing: bool, train_s: float, rss: float, heap: float | None = None, **extra
) -> dict:
    return {
        "trainer": trainer,
        "packing": packing,
        "train_s": train_s,
        "prep_s": 0.1,
        "steps": 4,
        "tokens": 900,
        "positions": 1000 if not packing else 900,
        "supervised_tokens": 400,
        "losses": [9.5, 9.4, 9.3, 9.2, 9.1],
        "eval_loss": 9.0,
        "peak_rss_mib": rss,
        "peak_heap_mib": heap if heap is not None else rss / 2,
        **extra,
    }


def test_report_ratios_and_verdict():
    groups = {
        "padded": [
            result("peftcli", False, 10.0, 600),
            result("trl", False, 12.0, 900, heap=500),
            result("trainer", False, 11.0, 650),
        ],
        "packed": [result("peftcli", True, 5.0, 610), result("trl", True, 8.0, 850)],
    }
    for rows in groups.values():
        rows[:] = [bench_train.derive(r, TINY, 8, peak=1e10) for r in rows]
        bench_train.add_ratios(rows)
    trl = groups["padded"][1]
    assert trl["time_vs_best"] == pytest.approx(1.2) and trl["rss_vs_best"] == pytest.approx(1.5)
    assert trl["heap_vs_best"] == pytest.approx(500 / 300)
    assert trl["padding_fraction"] == pytest.approx(0.1) and trl["supervised_tok_s"] == pytest.approx(
        400 / 12
    )
    assert trl["final_train_loss"] == pytest.approx(9.1)
    assert trl["mfu"] == pytest.approx(work.flops_per_token(TINY, 8) * 900 / 12 / 1e10)
    table = bench_train.main_table(groups)
    assert "| packed | transformers Trainer | n/a (no packing) |" in table
    assert "| padded | TRL SFTTrainer | 12.0 | 1.20× | 33 | 500 | 1.67× | 900 | 10.0% |" in table
    verdict = "\n".join(bench_train.verdict(groups))
    assert "padded: peftcli 10.0s/epoch vs transformers Trainer 11.0s" in verdict
    assert "peak heap 300 vs 325 MiB (lowest peer); peak RSS 600 vs 650 MiB (lowest peer)" in verdict
    assert "peftcli packed vs the fastest padded peer (transformers Trainer): 2.20× the throughput" in verdict
    failed = {"trainer": "trl", "packing": True, "error": "boom"}
    assert "failed: boom" in bench_train.main_table({"packed": [groups["packed"][0], failed]})


def test_gpu_variant_refuses_without_cuda(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_train.py"), "--gpu", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().startswith("bench --gpu: no CUDA GPU found")
    assert not list(tmp_path.iterdir())


def test_bad_argument_is_one_line_exit_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_train.py"), "--examples", "many"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "argument --examples: invalid int value: 'many'" in proc.stderr.splitlines()[-1]


@pytest.mark.slow
def test_quick_run_of_all_three_trainers(tmp_path):
    """`bench_train.py --quick`: every trainer trains the tiny model; without packing all three
    see the same batches, so their per-step losses agree (the same math)."""
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "bench_train.py"),
            "--quick",
            "--no-scaling",
            "--max-wait",
            "0",
            "--out",
            str(tmp_path),
            "--workdir",
            str(tmp_path / "work"),
        ],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "cpu-quick.json").read_text())
    padded = {r["trainer"]: r for r in report["groups"]["padded"]}
    assert set(padded) == {"peftcli", "trl", "trainer"}
    # float32, the same batches: losses (~9 = ln 8192) differ by the trainers summing the same
    # terms in another order, ~1e-6 relative per step, and Adam's normalised steps keep it there
    # over the few steps of --quick; 1e-4 absolute is ~1e-5 relative.
    assert padded["peftcli"]["losses"] == pytest.approx(padded["trainer"]["losses"], abs=1e-4)
    assert padded["trl"]["losses"] == pytest.approx(padded["trainer"]["losses"], abs=1e-4)
    assert len({r["supervised_tokens"] for r in padded.values()}) == 1
    packed = {r["trainer"]: r for r in report["groups"]["packed"]}
    assert set(packed) == {"peftcli", "trl"} and packed["trl"]["trl_padding_free"]
    assert packed["peftcli"]["padding_fraction"] < padded["peftcli"]["padding_fraction"]
    assert (tmp_path / "cpu-quick.png").stat().st_size > 10_000
    assert "| packed | transformers Trainer | n/a (no packing) |" in proc.stdout


def test_the_plain_loop_ceiling_trains_dense_batches(tokenizer_dir, tmp_path):
    """The GPU bench's ceiling row (`run_plain`): dense batch × max length, every position a token."""
    from bench_trainers import run_plain

    model = work.build_model(tmp_path / "m", TINY, tokenizer_dir)
    cfg = {"model": str(model), "r": 4, "alpha": 8, "lr": 1e-3, "seed": 0, "batch_size": 2}
    cfg |= {"max_length": 16, "precision": "fp32", "quantization": "none", "plain_steps": 2}
    out = run_plain(cfg)
    assert out["steps"] == 2 and out["tokens"] == out["positions"] == out["supervised_tokens"] == 2 * 2 * 16
    assert len(out["losses"]) == 2 and out["train_s"] > 0


def test_the_gpu_check_runs_on_a_cpu_up_to_the_first_cuda_call(tmp_path):
    """scripts/gpu_check.sh --dry-run: the environment built (a venv over this Python's packages,
    the console script), every package the check imports imported, then a stop before CUDA."""
    venv = tmp_path / "venv"
    proc = subprocess.run(
        [str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": sys.executable, "GPU_CHECK_VENV": str(venv)}
        | {"GPU_CHECK_WHEELS": str(tmp_path / "no-wheels"), "GPU_CHECK_RESULTS": str(tmp_path / "results")},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("gpu_check:")]
    assert "no wheels in" in lines[0] and "bitsandbytes 0.50" in proc.stdout + proc.stderr
    assert lines[-2].endswith("stopping before the first CUDA call")
    assert (venv / ".peftcli-installed").is_file() and not (tmp_path / "results").exists()
    version = subprocess.run(
        [str(venv / "bin" / "peftcli"), "--help"], capture_output=True, text=True, timeout=300
    )
    assert version.returncode == 0 and "train" in version.stdout
