"""GRPO's reference and every adapter family: the reference is the base with the adapter disabled
(every method, prompt learning included), or the starting adapter (peft.init_from, SFT → GRPO);
GRPO trains with each family (objectives × methods, as the preference grid)."""

from __future__ import annotations

import json

import pytest
import torch

from peftcli.methods.table import METHODS
from tests.conftest import cli, run_cli, write_jsonl, write_recipe
from tests.test_grpo import WORDS, grpo_recipe, prompts  # noqa: F401  (the fixture)
from tests.test_preference import adapter, rows_of


def train_sft(tmp_path, capsys) -> None:
    """A 6-step SFT run at tmp_path/sft (uppercasing WORDS): the adapter GRPO starts from."""
    sft_rows = [{"prompt": f"Uppercase: {w}\n", "completion": w.upper()} for w in WORDS]
    sft = write_recipe(
        tmp_path / "sft.yaml",
        data={"train": str(write_jsonl(tmp_path / "sft.jsonl", sft_rows)), "eval": 0.0},
        training={"max_steps": 6, "lr": 1e-2, "output_dir": str(tmp_path / "sft")},
    )
    assert cli("train", str(sft), capsys=capsys)[0] == 0


def test_sft_then_grpo_pulls_towards_the_sft_adapter(tmp_path, prompts, capsys) -> None:  # noqa: F811
    """GRPO from an SFT adapter with a KL term: at step 1 the policy is its reference (KL 0,
    though the SFT adapter is far from the base), and the run keeps the starting weights."""
    train_sft(tmp_path, capsys)
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
    recipe = grpo_recipe(tmp_path, prompts, [{"kind": "regex", "pattern": "[a-z]"}], "ev", num_generations=6)
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
    trained = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert trained.get("examples") != 3  # --data leaves the run's own eval.json alone
    # Its own held-out prompts: what training's final evaluation sampled (the run's seed, each
    # prompt's own streams), the same adapter weights: the same rewards, exactly. In a fresh
    # process: torch's seed is not the one training left behind.
    done = run_cli("eval", str(tmp_path / "ev"), "--json")
    again = json.loads(done.stdout)
    assert done.returncode == 0 and (again["reward"], again["reward_greedy"]) == (
        trained["reward"],
        trained["reward_greedy"],
    )
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


def moved_model(method: str, builtin: str = "tiny-llama") -> tuple:
    """A tokenizer, the base model, and the base wrapped with `method` whose trainable
    parameters are moved away from their (often identity) start, in eval mode."""
    from peftcli.methods.apply import apply_method
    from peftcli.model.load import load_model, load_tokenizer
    from peftcli.recipe import ModelSection, PeftSection

    section = ModelSection(
        name_or_path=f"builtin:{builtin}", quantization="4bit" if method == "qlora" else "none"
    )
    model = apply_method(load_model(section), PeftSection(method=method), "causal_lm", total_steps=10)
    model.eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    return load_tokenizer(section), load_model(section), model


@pytest.mark.parametrize("method", FAMILIES)
def test_generation_samples_the_model_training_scores(method: str) -> None:
    """GRPO's greedy answers (generate, as it samples) are, token by token, the argmax of the
    logits training scores them with: the samples come from the policy being trained (prompt
    learning decoded by peftcli on unpadded rows, see GRPO.sample and completion_logits)."""
    from peftcli.objectives.build import build_objective
    from peftcli.objectives.grpo import completion_logits
    from peftcli.objectives.rl_section import GrpoSection
    from peftcli.recipe import EvalSection

    tokenizer, _, model = moved_model(method)
    section = GrpoSection(max_new_tokens=6, rewards=[{"kind": "length"}])
    objective = build_objective("grpo", "causal_lm", tokenizer, EvalSection(), None, False, section)
    examples = [
        {"input_ids": tokenizer(t)["input_ids"], "prompt": t, "columns": {}, "row": i}
        for i, t in enumerate(("Uppercase: cat\n", "Uppercase: a longer prompt\n"))
    ]
    sampled = objective.sample(model, objective.collate(examples), 1, None)
    with torch.no_grad():
        best = completion_logits(model, sampled, 1.0).argmax(-1)
    kept = sampled["completion_mask"].bool()
    assert kept.sum() >= 4 and torch.equal(best[kept], sampled["completion_ids"][kept]), method


@pytest.mark.parametrize("method", FAMILIES)
def test_the_reference_is_the_base_for_every_family(method: str) -> None:
    """With its adapter moved away from the identity, each family's model scores completions
    differently from the base; with the adapter disabled (GRPO's reference) exactly as the base
    (prompt learning: the virtual tokens are gone, not just frozen)."""
    from peftcli.objectives.grpo import token_logps

    tokenizer, base_model, model = moved_model(method)
    batch = left_padded(tokenizer)
    with torch.no_grad():
        base = token_logps(base_model, batch, 1.0)
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
    base, and moves away from it; prompt learning starts away from it (its virtual tokens are
    random, and the reference drops them), and its KL moves."""
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
    if method in PROMPT_LEARNING:  # far from the base at the start: the KL term may pull it back
        assert rows[0]["kl"] > 1e-4 and rows[-1]["kl"] != rows[0]["kl"], rows
    else:
        # Identity at the start: exact but for DoRA's weight-norm rounding (~1e-7 relative) and
        # metrics.jsonl's 6 decimals (5e-7); 1e-5 covers both.
        assert rows[0]["kl"] <= 1e-5 and rows[-1]["kl"] > rows[0]["kl"], rows


@pytest.mark.slow  # `make test-all`: the default suite resumes GRPO from the base (test_grpo.py)
def test_sft_then_grpo_resumes_against_the_adapter_it_started_from(tmp_path, prompts, capsys) -> None:  # noqa: F811
    """SIGKILL, then the SFT adapter is changed, then --resume: the run still pulls towards the
    weights it started from (kept in the run), logging what an uninterrupted run logged."""
    from safetensors.torch import load_file, save_file

    from .test_resume import EVERY, kill_after_first_checkpoint

    train_sft(tmp_path, capsys)

    def recipe(name: str):
        import yaml

        path = grpo_recipe(tmp_path, prompts, [{"kind": "regex", "pattern": "[a-z]"}], name, beta=0.5)
        raw = yaml.safe_load(path.read_text())
        raw["peft"]["init_from"] = str(tmp_path / "sft")
        raw["data"]["eval"] = 0.0
        raw["training"].update(max_steps=2 * EVERY, save_every=EVERY, log_every=1, lr=1e-2)
        path.write_text(yaml.safe_dump(raw))
        return path

    assert cli("train", str(recipe("whole")), capsys=capsys)[0] == 0
    assert kill_after_first_checkpoint(recipe("run"), tmp_path / "run") < 2 * EVERY
    weights = tmp_path / "sft" / "adapter" / "adapter_model.safetensors"
    save_file({k: 2 * v for k, v in load_file(weights).items()}, weights)  # retrained since
    code, _, err = cli("train", str(recipe("run")), "--resume", capsys=capsys)
    assert code == 0, err[-2000:]
    got, want = rows_of(tmp_path / "run"), rows_of(tmp_path / "whole")
    for row in got + want:
        row.pop("tokens_per_s")  # wall time
    assert got == want  # bit for bit, the KL to the starting adapter included
