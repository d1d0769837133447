"""`peftcli compare`: several methods trained on one recipe, each in its own process; the table's
numbers are the runs' own (trainable counts, adapter file sizes, eval loss), a method that
cannot work becomes an error row, and mistakes in the command end with exit 2 before training."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

from peftcli.commands.compare import COLUMNS
from peftcli.commands.estimate import estimate
from peftcli.recipe_file import load_recipe

from .conftest import cli, write_recipe


def gpt2_recipe(tmp_path: Path) -> Path:
    return write_recipe(tmp_path / "r.yaml", model={"name_or_path": "builtin:tiny-gpt2"})


def test_compare_three_methods_and_an_error_row(tmp_path, completion_data, capsys):
    recipe = gpt2_recipe(tmp_path)
    out = tmp_path / "cmp"
    args = [
        "--methods",
        "lora,ia3,prompt_tuning,loha",
        "--max-steps",
        "2",
        "--output-dir",
        str(out),
        "--json",
    ]
    code, stdout, stderr = cli("compare", str(recipe), *args, capsys=capsys)
    assert code == 0, stderr
    rows = json.loads(stdout)["rows"]  # stdout is exactly one JSON document
    assert [r["method"] for r in rows] == ["lora", "ia3", "prompt-tuning", "loha"]
    assert all(set(r) >= set(COLUMNS) for r in rows)

    trained, failed = rows[:3], rows[3]
    # GPT-2's Conv1D layers cannot take LoHa: a row with the reason, and nothing trained for it.
    assert "loha cannot adapt the Conv1D layers" in failed["error"]
    assert failed["trainable_params"] is None and not (out / "loha").exists()
    assert [r["mergeable"] for r in rows] == [True, True, False, True]
    recipes = []
    for row in trained:
        run = out / row["method"]
        evals = json.loads((run / "eval.json").read_text())
        assert row["error"] is None and row["steps"] == 2
        assert row["trainable_params"] == evals["train"]["trainable_params"]
        assert row["share"] == pytest.approx(row["trainable_params"] / evals["train"]["total_params"])
        # The same count the meta-device estimate makes, from a different path.
        assert (
            row["trainable_params"]
            == estimate(load_recipe(recipe, [f"peft.method={row['method']}"]))["trainable_params"]
        )
        assert row["adapter_bytes"] == (run / "adapter" / "adapter_model.safetensors").stat().st_size
        assert row["eval_loss"] == evals["loss"]
        assert row["tokens_per_s"] > 0
        assert 100 * 2**20 < row["peak_memory_bytes"] < 16 * 2**30  # a whole Python + torch process
        assert row["memory_kind"] == (
            "cuda_max_memory_allocated" if torch.cuda.is_available() else "cpu_peak_rss"
        )
        resolved = yaml.safe_load((run / "recipe.yaml").read_text())
        assert resolved["training"]["max_steps"] == 2 and resolved["peft"]["method"] == row["method"]
        resolved["peft"].pop("method")
        resolved["training"].pop("output_dir")
        recipes.append(resolved)
    assert recipes[0] == recipes[1] == recipes[2]  # same model, data, steps and seed
    assert trained[0]["trainable_params"] > max(
        trained[1]["trainable_params"], trained[2]["trainable_params"]
    )

    with (out / "compare.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["method"] for r in table] == [r["method"] for r in rows]
    assert int(table[0]["trainable_params"]) == rows[0]["trainable_params"]
    assert table[3]["error"] and not table[3]["eval_loss"]
    markdown = (out / "compare.md").read_text()
    assert markdown.startswith("| method |") and "`prompt-tuning`" in markdown and "Conv1D" in markdown
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Again without --overwrite: refused before anything trains.
    code, _, err = cli("compare", str(recipe), *args, capsys=capsys)
    assert code == 2 and "already holds a peftcli compare output" in err and "--overwrite" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 trains on a GPU")
def test_an_error_while_training_is_a_row_and_the_table_is_printed(tmp_path, completion_data, capsys):
    recipe = gpt2_recipe(tmp_path)
    out = tmp_path / "cmp"
    code, stdout, _ = cli(
        "compare",
        str(recipe),
        "training.mixed_precision=fp16",
        "--methods",
        "lora",
        "--output-dir",
        str(out),
        capsys=capsys,
    )
    assert code == 0
    assert stdout.splitlines()[0].split()[:2] == ["method", "trainable_params"]
    assert "lora: error: training.mixed_precision: fp16 needs a CUDA GPU" in stdout
    assert "compare.csv" in stdout and (out / "compare.md").is_file()


def test_mistakes_exit_2_before_anything_trains(tmp_path, completion_data, capsys):
    recipe = gpt2_recipe(tmp_path)
    out = tmp_path / "cmp"
    code, _, err = cli(
        "compare", str(recipe), "--methods", "lora,lorra", "--output-dir", str(out), capsys=capsys
    )
    assert code == 2 and "unknown method `lorra` (did you mean `lora`?)" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()
    code, _, err = cli("compare", str(recipe), capsys=capsys)
    assert code == 2 and "compare needs --methods" in err
    code, _, err = cli("compare", str(recipe), "--methods", "lora,lora", capsys=capsys)
    assert code == 2 and "`lora` is listed twice" in err
    code, _, err = cli("compare", str(recipe), "--methods", "lora", "--max-steps", "0", capsys=capsys)
    assert code == 2 and "--max-steps" in err
    code, _, err = cli("compare", str(recipe), "training.lr=-1", "--methods", "lora", capsys=capsys)
    assert code == 2 and "training.lr" in err
