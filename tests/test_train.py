"""End to end: train real tiny models on CPU, check the run folder, reload the adapter with plain
PEFT in a fresh process, and check the loss normalisation that makes accumulation exact."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from peftcli.recipe_file import load_recipe
from peftcli.training.run import train

from .conftest import cli, write_recipe

HERE = Path(__file__).resolve().parent


def reload_logits(adapter: Path, tmp_path: Path, quant: str = "") -> torch.Tensor:
    out = tmp_path / "logits.pt"
    subprocess.run(
        [sys.executable, str(HERE / "reload_adapter.py"), str(adapter), str(out), quant],
        check=True,
        capture_output=True,
        text=True,
    )
    return torch.load(out)


def own_logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        ids = torch.tensor([list(range(40, 72))], device=next(model.parameters()).device)
        return model(input_ids=ids).logits.cpu()


def check_run_folder(run: Path, steps: int) -> list[dict]:
    for name in (
        "recipe.yaml",
        "metrics.jsonl",
        "eval.json",
        "loss.png",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "adapter/tokenizer.json",
    ):
        assert (run / name).is_file(), name
    assert not (run / ".incomplete").exists()
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, steps + 1))  # each step once, from 1
    assert all({"epoch", "lr", "tokens", "tokens_per_s"} <= set(r) for r in train_rows)
    assert "eval_loss" in rows[-1] and "loss" not in rows[-1]
    load_recipe(run / "recipe.yaml")  # the resolved recipe is itself a valid recipe
    return train_rows


def test_lora_trains_saves_and_reloads_with_plain_peft(tmp_path, completion_data, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", training={"max_steps": 8})
    code, _, err = cli("train", str(recipe), capsys=capsys)
    assert code == 0, err
    run = tmp_path / "run"
    rows = check_run_folder(run, 8)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.2, "loss should fall"
    evals = json.loads((run / "eval.json").read_text())
    assert evals["loss"] > 0 and evals["perplexity"] > 1 and evals["train"]["steps"] == 8
    assert "trainable of" in err and "saved" in err


@pytest.mark.parametrize(
    ("model", "method", "quant"),
    [
        ("builtin:tiny-llama", "lora", ""),
        ("builtin:tiny-gpt2", "lora", ""),
        ("builtin:tiny-llama", "qlora", "4bit"),
    ],
    ids=["llama-lora", "gpt2-lora", "llama-qlora"],
)
def test_saved_adapter_reproduces_the_trained_model(tmp_path, completion_data, model, method, quant):
    recipe = load_recipe(
        write_recipe(
            tmp_path / "r.yaml",
            model={"name_or_path": model},
            peft={"method": method},
            training={"max_steps": 6},
        )
    )
    trained = train(recipe)
    rows = check_run_folder(trained.run_dir, 6)
    assert rows[-1]["loss"] < rows[0]["loss"], "loss should fall"
    if method == "qlora":
        import bitsandbytes as bnb

        assert recipe.model.quantization == "4bit"
        layers = [m for m in trained.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert layers and all(m.weight.quant_state.quant_type == "nf4" for m in layers)
    mine = own_logits(trained.model)
    theirs = reload_logits(trained.run_dir / "adapter", tmp_path, quant)
    # float32 logits (|z| < 5) of the same weights and input in two processes: equal up to a
    # kernel summing the 128-352-term dot products in another order (~1e-6; 0 measured), so
    # 1e-4 is margin; a missing or mis-scaled adapter moves them by what 6 steps trained.
    assert torch.allclose(mine, theirs, atol=1e-4), (mine - theirs).abs().max()
    # The adapter changed the model: the saved weights are not a no-op.
    lora_b = [p for n, p in trained.model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)


def adapter_weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run / "adapter" / "adapter_model.safetensors")


# Exactness tests run in float64. Changing how a sum is split (micro-batches, processes) changes
# its rounding by about 1e-16 relative per term; a few thousand terms per gradient and a handful
# of Adam steps (which divide by sqrt(v): no amplification unless a gradient is ~1e-8) keep the
# weights within 1e-12 of each other. 1e-10 leaves two orders of margin on any CPU, while a real
# difference in the math (a repeated example, a wrong normaliser) moves weights by ~1e-4.
EXACT = 1e-10


def test_gradient_accumulation_equals_one_big_batch(tmp_path, completion_data):
    """Loss is normalised per supervised token of the whole global batch, so 2 × 4 == 1 × 8
    even though the micro-batches hold different numbers of supervised tokens — also across an
    epoch's end, where the last group is short (the train rows do not divide by 8)."""
    runs = {}
    for name, batch, accum in [("big", 8, 1), ("accum", 4, 2)]:
        recipe = load_recipe(
            write_recipe(
                tmp_path / f"{name}.yaml",
                model={"dtype": "float64"},
                data={"eval": 0.1},
                training={
                    "max_steps": 10,
                    "mixed_precision": "no",  # float64 throughout, on a GPU too
                    "batch_size": batch,
                    "grad_accum": accum,
                    "output_dir": str(tmp_path / name),
                },
            )
        )
        runs[name] = adapter_weights(train(recipe).run_dir)
    # float64 weights: EXACT's reason is at its definition
    for key, big in runs["big"].items():
        assert torch.allclose(big, runs["accum"][key], rtol=0, atol=EXACT), key


def test_existing_run_is_refused_then_replaced_only_on_success(tmp_path, completion_data, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", training={"max_steps": 2})
    assert cli("train", str(recipe), capsys=capsys)[0] == 0
    run = tmp_path / "run"
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}

    code, _, err = cli("train", str(recipe), capsys=capsys)
    assert code == 2 and "already holds a run" in err and "--overwrite" in err

    # A run that fails with --overwrite leaves the old run byte-identical.
    code, _, err = cli("train", str(recipe), "--overwrite", "training.lr=1e30", capsys=capsys)
    assert code == 2 and "diverged" in err, err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before

    code, _, err = cli("train", str(recipe), "--overwrite", "training.max_steps=3", capsys=capsys)
    assert code == 0, err
    assert "max_steps: 3" in (run / "recipe.yaml").read_text()
    assert not list(tmp_path.glob(".run.*"))


def test_eval_compare_base_json(tmp_path, completion_data, capsys):
    recipe = write_recipe(
        tmp_path / "r.yaml",
        training={"max_steps": 4},
        eval={"metrics": ["loss", "exact_match"], "max_new_tokens": 4},
    )
    assert cli("train", str(recipe), capsys=capsys)[0] == 0
    code, out, err = cli("eval", str(tmp_path / "run"), "--compare-base", "--json", capsys=capsys)
    assert code == 0, err
    result = json.loads(out)  # stdout holds exactly one JSON document
    assert set(result) == {"base", "adapter"}
    for side in result.values():
        assert {"loss", "exact_match", "examples"} <= set(side)
        assert 0.0 <= side["exact_match"] <= 1.0
    assert result["adapter"]["loss"] < result["base"]["loss"]
    # The adapter's loss measured by `eval` equals the one measured at the end of training.
    trained = json.loads((tmp_path / "run" / "eval.json").read_text())
    # The same float32 eval of the same weights (float64 sum of per-example losses): equal up
    # to the kernels' rounding, ~1e-7 relative; 1e-5 is margin, not a machine's noise.
    assert result["adapter"]["loss"] == pytest.approx(trained["loss"], rel=1e-5)
