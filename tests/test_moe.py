"""Mixture-of-experts and coverage: on builtin:tiny-mixtral (transformers' Mixtral, experts fused
into 3-D parameters) `all-linear` leaves the experts out and `validate` says so; `experts` in
peft.target_modules adapts them with LoRA (PEFT's target_parameters) with a trainable count
equal to a hand count; a run trains, records its coverage, and merges to the adapter's
outputs; `merge` reports how far it moved the model and warns when nothing moved."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from peftcli.model import builtin
from peftcli.recipe_file import load_recipe

from .conftest import ROOT, cli, run_cli, write_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

PROBE = torch.tensor([list(range(40, 60)), list(range(60, 80))])
# Merged against unmerged float32 logits (|z| < 10): merging rounds W + s·BA to float32 once per
# weight (~6e-8 relative), which through tiny-mixtral's 2 layers moves logits by ~1e-6 (merge's
# report measured 1e-6 after 8 steps, 8e-6 after the shipped recipe's 188); 1e-4 leaves 12x.
# The router is not adapted, so its top-2 choice sees inputs equal to ~1e-7, and a flip would
# need two experts' scores that close. A merge that dropped the experts' update moves the
# logits by its whole effect (> 0.1).
MERGE_ATOL = 1e-4


def moe_recipe(tmp_path: Path, completion_data: Path, **peft) -> Path:
    return write_recipe(
        tmp_path / "moe.yaml",
        model={"name_or_path": "builtin:tiny-mixtral"},
        peft={"target_modules": ["all-linear", "experts"], **peft},
        data={"train": str(completion_data), "eval": 0.25},
        training={"max_steps": 8, "lr": 1e-2, "batch_size": 8},
    )


def hand_count(config: dict, r: int) -> dict[str, int]:
    """LoRA's trainable parameters from the config: r·(in + out) per linear layer; per fused
    expert tensor, one such pair per expert: n_experts · r · (in + out)."""
    h, inter, experts = config["hidden_size"], config["intermediate_size"], config["num_local_experts"]
    kv = config["num_key_value_heads"] * (config.get("head_dim") or h // config["num_attention_heads"])
    attention = r * (h + h) + 2 * r * (h + kv) + r * (h + h)  # q, k and v, o
    fused = experts * r * (h + 2 * inter) + experts * r * (inter + h)  # gate_up_proj, down_proj
    layers = config["num_hidden_layers"]
    return {"attention": layers * attention, "experts": layers * fused}


def test_validate_says_all_linear_leaves_the_experts_out(tmp_path, completion_data, capsys):
    recipe = moe_recipe(tmp_path, completion_data, target_modules="all-linear")
    proc = run_cli("validate", str(recipe))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "peft: lora on 8 modules (k_proj, o_proj, q_proj, v_proj)" in out
    assert "  experts     0 of 4 tensors, 0 of 147,456 weights" in out
    assert "  router      0 of 2 tensors" in out
    warning = [line for line in out.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "none of the 4 expert tensors" in warning[0] and "`experts`" in warning[0]

    code, out, _ = cli("validate", str(recipe), "peft.target_modules=[all-linear,experts]", capsys=capsys)
    assert code == 0
    assert "and 4 parameters (experts.down_proj, experts.gate_up_proj)" in out
    assert "  experts     4 of 4 tensors, 147,456 of 147,456 weights" in out
    assert "warning:" not in out


def test_expert_lora_counts_equal_a_hand_count(tmp_path, completion_data, capsys):
    """Training's wrapped model, `estimate` (meta device) and the hand count agree exactly."""
    from peftcli.methods.apply import apply_method
    from peftcli.methods.coverage import of_model
    from peftcli.model.load import load_model

    recipe = load_recipe(moe_recipe(tmp_path, completion_data))
    config = json.loads((builtin.materialise("tiny-mixtral") / "config.json").read_text())
    want = hand_count(config, recipe.peft.r)
    model = apply_method(load_model(recipe.model), recipe.peft, "causal_lm")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    coverage = of_model(model)
    assert trainable == want["attention"] + want["experts"] == coverage["trainable_params"]
    assert coverage["kinds"]["experts"]["trainable"] == want["experts"]
    assert coverage["kinds"]["attention"]["trainable"] == want["attention"]
    assert sorted(model.peft_config["default"].target_parameters) == [
        "experts.down_proj",
        "experts.gate_up_proj",
    ]

    code, out, _ = cli("estimate", str(tmp_path / "moe.yaml"), "--json", capsys=capsys)
    estimate = json.loads(out)
    assert code == 0 and estimate["trainable_params"] == trainable
    assert estimate["coverage"]["kinds"] == coverage["kinds"]
    code, out, _ = cli("estimate", str(tmp_path / "moe.yaml"), capsys=capsys)
    assert f"  experts     4 of 4 tensors, 147,456 of 147,456 weights, trainable {want['experts']:,}" in out


def test_expert_lora_trains_records_its_coverage_and_merges_to_its_outputs(tmp_path, completion_data):
    from transformers import AutoModelForCausalLM

    from peftcli.training.run import train

    trained = train(load_recipe(moe_recipe(tmp_path, completion_data)))
    losses = [
        json.loads(x)["loss"] for x in (trained.run_dir / "metrics.jsonl").read_text().splitlines()[:-1]
    ]
    assert losses[-1] < losses[0]
    trained.model.eval()
    with torch.no_grad():
        adapter_logits = trained.model(input_ids=PROBE).logits
    coverage = json.loads((trained.run_dir / "coverage.json").read_text())
    assert coverage["kinds"]["experts"]["reached_tensors"] == coverage["kinds"]["experts"]["tensors"] == 4
    assert coverage["kinds"]["router"]["reached_tensors"] == 0
    assert "model.layers.1.mlp.experts.gate_up_proj" in coverage["reached"]

    proc = run_cli("merge", str(trained.run_dir), "-o", str(tmp_path / "merged"))
    assert proc.returncode == 0, proc.stderr
    assert "peftcli: merge moved 12 of 12 adapted weights" in proc.stderr
    report = json.loads((tmp_path / "merged" / "merge_report.json").read_text())["change"]
    assert report["largest_relative_weight_change"] > 0 and report["rows"] == 4
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        merged_logits = merged(input_ids=PROBE).logits
    assert torch.allclose(merged_logits, adapter_logits, atol=MERGE_ATOL)  # see MERGE_ATOL
    assert (merged_logits - adapter_logits).abs().max() < (adapter_logits - base_logits()).abs().max()


def base_logits() -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(builtin.materialise("tiny-mixtral")).eval()
    with torch.no_grad():
        return base(input_ids=PROBE).logits


def test_coverage_record_of_a_tiny_llama_run(tmp_path, completion_data, capsys):
    """LoRA on attention only: the run's coverage.json names the 16 attention projections and
    nothing else, and agrees with what `validate` reads from the checkpoint's headers."""
    from peftcli.methods.coverage import of_recipe
    from peftcli.training.run import train

    recipe = load_recipe(
        write_recipe(
            tmp_path / "r.yaml",
            peft={"target_modules": "attention"},
            data={"train": str(completion_data), "eval": 0},
            training={"max_steps": 1},
        )
    )
    run = train(recipe).run_dir
    coverage = json.loads((run / "coverage.json").read_text())
    kinds = coverage["kinds"]
    assert len(coverage["reached"]) == kinds["attention"]["reached_tensors"] == 16
    assert all(
        n.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"))
        for n in coverage["reached"]
    )
    assert kinds["mlp"] == {**kinds["mlp"], "reached_tensors": 0, "reached_weights": 0, "trainable": 0}
    assert kinds["attention"]["trainable"] == coverage["trainable_params"]
    assert (
        coverage["trainable_params"]
        == json.loads((run / "eval.json").read_text())["train"]["trainable_params"]
    )
    assert coverage["warnings"] == []
    _, headers = of_recipe(recipe, builtin.materialise("tiny-llama"))
    assert {k: {**v, "trainable": 0} for k, v in kinds.items()} == headers["kinds"]
    assert headers["reached"] == coverage["reached"]


def test_merge_warns_when_the_adapter_changes_nothing(tmp_path, capsys):
    """A LoRA as PEFT initialises it (B = 0) merges into the base unchanged: merge says so."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = builtin.materialise("tiny-llama")
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, target_modules=["q_proj"])
    )
    model.save_pretrained(tmp_path / "untrained")
    code, _, err = cli("merge", str(tmp_path / "untrained"), "-o", str(tmp_path / "merged"), capsys=capsys)
    assert code == 0, err
    assert "peftcli: merge moved 0 of 4 adapted weights; largest relative change 0" in err
    assert "peftcli: warning: the adapter changes nothing" in err
    report = json.loads((tmp_path / "merged" / "merge_report.json").read_text())["change"]
    assert report["changed_layers"] == 0 and report["largest_relative_weight_change"] == 0.0


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"method": "dora"}, "peft.target_modules: dora cannot adapt fused expert or router parameters"),
        (
            {"dropout": 0.05},
            "peft.dropout: 0.05 does not work with LoRA on fused expert or router parameters",
        ),
        (
            {"options": {"target_parameters": ["gate_up_proj"]}},
            "peft.options.target_parameters is what peft.target_modules sets",
        ),
    ],
)
def test_expert_targets_refuse_what_cannot_work(tmp_path, completion_data, capsys, change, expected):
    recipe = moe_recipe(tmp_path, completion_data)
    text = yaml.safe_load(recipe.read_text())
    text["peft"].update(change)
    recipe.write_text(yaml.safe_dump(text))
    code, _, err = cli("validate", str(recipe), capsys=capsys)
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err


def test_moe_recipe_is_shipped():
    recipe = yaml.safe_load((ROOT / "recipes" / "methods" / "lora-experts.yaml").read_text())
    assert (
        recipe["model"]["name_or_path"] == "builtin:tiny-mixtral"
        and "experts" in recipe["peft"]["target_modules"]
    )
