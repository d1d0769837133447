"""GRPO's reference and every adapter family: the reference is the base with the adapter disabled
(every method, prompt learning included), or the starting adapter (peft.init_from, SFT → GRPO);
GRPO trains with each family (objectives × methods, as the preference grid)."""

from __future__ import annotations

import json

import pytest
import torch

from peftcli.methods.table import METHODS
from tests.conftest import cli, write_jsonl, write_recipe
from tests.test_grpo import WORDS, grpo_recipe, prompts  # noqa: F401  (the fixture)
from tests.test_preference import adapter, rows_of


def test_sft_then_grpo_pulls_towards_the_sft_adapter(tmp_path, prompts, capsys) -> None:  # noqa: F811
    """GRPO from an SFT adapter with a KL term: at step 1 the policy is its reference (KL 0,
    though the SFT adapter is far from the base), and the run keeps the starting weights."""
    sft_rows = [{"prompt": f"Uppercase: {w}\n", "completion": w.upper()} for w in WORDS]
    sft = write_recipe(
        tmp_path / "sft.yaml",
        data={"train": str(write_jsonl(tmp_path / "sft.jsonl", sft_rows)), "eval": 0.0},
        training={"max_steps": 6, "lr": 1e-2, "output_dir": str(tmp_path / "sft")},
    )
    assert cli("train", str(sft), capsys=capsys)[0] == 0
    start = adapter(tmp_path / "sft")
    assert all(v.abs().max() > 1e-3 for k, v in start.items() if "lora_B" in k)  # not the base
    recipe = grpo_recipe(tmp_path, prompts, [{"kind": "regex", "pattern": "[A-Z]"}], "rl", beta=0.5)
    code, _, err = cli(
        "train", str(recipe), f"peft.init_from={tmp_path / 'sft'}", "training.log_every=1",
        "training.lr=1e-2", "training.max_steps=3", capsys=capsys,
    )  # fmt: skip
    assert code == 0, err[-2000:]
    assert "objective grpo from" in err
    rows = rows_of(tmp_path / "rl")
    # Step 1: the same weights score the same completions, bit for bit: k3 = e^0 − 0 − 1 = 0.
    assert rows[0]["kl"] == 0.0 and rows[-1]["kl"] > 0, rows
    from safetensors.torch import load_file

    kept = load_file(tmp_path / "rl" / "reference.safetensors")
    assert {k.replace(".default", "") for k in kept} == set(start)
    for k, v in kept.items():
        assert torch.equal(v, start[k.replace(".default", "")]), k  # copied, not recomputed
    trained = adapter(tmp_path / "rl")
    assert any(not torch.equal(trained[k], start[k]) for k in start)


def test_grpo_eval_reads_held_out_prompts_from_a_file(tmp_path, prompts, capsys) -> None:  # noqa: F811
    """`eval --data FILE` on a GRPO run: the mean reward on the file's prompts, sampled and
    greedy, with --compare-base too; a file without prompts is refused in one line."""
    recipe = grpo_recipe(tmp_path, prompts, [{"kind": "regex", "pattern": "[A-Z]"}], "ev")
    assert cli("train", str(recipe), capsys=capsys)[0] == 0
    held = write_jsonl(
        tmp_path / "held.jsonl", [{"prompt": f"Uppercase: {w}\n"} for w in ("bee", "cow", "gnu")]
    )
    code, out, err = cli("eval", str(tmp_path / "ev"), "--data", str(held), "--json", capsys=capsys)
    assert code == 0, err[-2000:]
    result = json.loads(out)
    assert result["examples"] == 3 and 0 <= result["reward"] <= 1 and 0 <= result["reward_greedy"] <= 1
    assert [s["prompt"] for s in result["samples"]] == [
        "Uppercase: bee\n",
        "Uppercase: cow\n",
        "Uppercase: gnu\n",
    ]
    code, out, err = cli("eval", str(tmp_path / "ev"), "--data", str(held), "--compare-base", capsys=capsys)
    assert code == 0 and "reward_greedy" in out and "base" in out, err[-2000:]
    before = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert before.get("examples") != 3  # --data leaves the run's own eval.json alone
    wrong = write_jsonl(tmp_path / "wrong.jsonl", [{"text": "no prompt here"}])
    code, _, err = cli("eval", str(tmp_path / "ev"), "--data", str(wrong), capsys=capsys)
    assert code == 2 and "`prompt`" in err and len(err.strip().splitlines()) == 1, err


# --------------------------------------------------------------------------- every adapter family

# Every method that trains a causal LM (the table's rows; qlora is lora on a 4-bit base).
FAMILIES = [m for m, spec in METHODS.items() if "causal_lm" in spec.tasks]
PROMPT_LEARNING = {
    m for m, spec in METHODS.items() if spec.kind == "prompt"
}  # start with random virtual tokens
DEFAULT = {"lora", "qlora", "prompt-tuning", "llama-adapter"}  # `make test-all` trains the rest
GRID = [pytest.param(m, id=m, marks=[] if m in DEFAULT else [pytest.mark.slow]) for m in FAMILIES]


def left_padded(tokenizer) -> dict[str, torch.Tensor]:
    """Two prompts of different lengths (left-padded, as GRPO batches them) with completions."""
    encoded = [tokenizer(t)["input_ids"] for t in ("Uppercase: cat\n", "Uppercase: a longer prompt\n")]
    longest, pad = max(map(len, encoded)), tokenizer.pad_token_id
    completion = torch.tensor([[5, 9, 13, 17], [6, 10, 14, 18]])
    return {
        "prompt_ids": torch.tensor([[pad] * (longest - len(e)) + e for e in encoded]),
        "prompt_mask": torch.tensor([[0] * (longest - len(e)) + [1] * len(e) for e in encoded]),
        "completion_ids": completion,
        "completion_mask": torch.ones_like(completion),
    }


@pytest.mark.parametrize("method", FAMILIES)
def test_the_reference_is_the_base_for_every_family(method: str) -> None:
    """With its adapter moved away from the identity, each family's model scores completions
    differently from the base; with the adapter disabled (GRPO's reference) exactly as the base
    (prompt learning: the virtual tokens are gone, not just frozen)."""
    from peftcli.methods.apply import apply_method
    from peftcli.model.load import load_model, load_tokenizer
    from peftcli.objectives.grpo import token_logps
    from peftcli.recipe import ModelSection, PeftSection

    section = ModelSection(
        name_or_path="builtin:tiny-llama", quantization="4bit" if method == "qlora" else "none"
    )
    tokenizer = load_tokenizer(section)
    batch = left_padded(tokenizer)
    with torch.no_grad():
        base = token_logps(load_model(section), batch, 1.0)
        model = apply_method(load_model(section), PeftSection(method=method), "causal_lm", total_steps=10)
        model.eval()
        torch.manual_seed(0)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
        adapted = token_logps(model, batch, 1.0)
        with model.disable_adapter():
            disabled = token_logps(model, batch, 1.0)
        again = token_logps(model, batch, 1.0)
    assert (adapted - base).abs().max() > 1e-3, method
    assert torch.equal(disabled, base), (disabled - base).abs().max()  # the same kernels on the same weights
    assert torch.equal(again, adapted)  # enabled again on leaving


@pytest.mark.parametrize("method", GRID)
def test_grpo_trains_every_adapter_family(tmp_path, prompts, capsys, method: str) -> None:  # noqa: F811
    """Three steps with a KL term: a family that starts as the identity starts at KL 0 to the
    base; prompt learning starts away from it (its virtual tokens are random, and the reference
    drops them); every family's adapter moves and the KL to the base grows."""
    recipe = grpo_recipe(
        tmp_path, prompts, [{"kind": "regex", "pattern": "[a-z]"}], "g", beta=0.1, num_generations=4
    )
    lr = {"ia3": 5e-2, "vera": 5e-2, "prompt-tuning": 5e-2, "p-tuning": 1e-2, "llama-adapter": 5e-2}.get(
        method, 1e-2
    )
    code, _, err = cli(
        "train", str(recipe), f"peft.method={method}", f"training.lr={lr}", "training.max_steps=3",
        "training.log_every=1", "training.warmup_ratio=0", "training.batch_size=4", "data.eval=0", capsys=capsys,
    )  # fmt: skip
    assert code == 0, err[-2000:]
    rows = rows_of(tmp_path / "g")
    assert len(rows) == 3 and all(0 <= r["reward"] <= 1 for r in rows), rows
    if method in PROMPT_LEARNING:
        assert rows[0]["kl"] > 1e-4, rows[0]
    else:
        # Identity at the start: exact but for DoRA's weight-norm rounding (~1e-7 relative) and
        # metrics.jsonl's 6 decimals (5e-7); 1e-5 covers both.
        assert rows[0]["kl"] <= 1e-5, rows[0]
    assert rows[-1]["kl"] > rows[0]["kl"], rows
