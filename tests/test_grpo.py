"""GRPO (training.objective: grpo): rewards, the mistakes a user makes, a run's metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peftcli.errors import UserError
from peftcli.objectives.rewards import Rewards
from peftcli.objectives.rl_section import RewardSpec
from tests.conftest import cli, one_error_line, run_cli, write_jsonl, write_recipe

WORDS = ["cat", "dog", "owl", "fox", "emu", "yak", "elk", "ant"]


@pytest.fixture
def prompts(tmp_path) -> Path:
    rows = [{"prompt": f"Uppercase: {w}\n", "answer": w.upper()} for w in WORDS * 2]
    return write_jsonl(tmp_path / "prompts.jsonl", rows)


def grpo_recipe(tmp_path: Path, train: Path, rewards: list[dict], name: str = "r", **grpo) -> Path:
    return write_recipe(
        tmp_path / f"{name}.yaml",
        data={"train": str(train), "eval": 0.25, "max_length": 48},
        training={
            "objective": "grpo",
            "max_steps": 2,
            "batch_size": 2,
            "output_dir": str(tmp_path / name),
        },
        grpo={"num_generations": 2, "max_new_tokens": 4, "rewards": rewards, **grpo},
    )


def spec(**kw) -> RewardSpec:
    return RewardSpec(**kw)


def test_builtin_rewards_and_their_weighted_sum() -> None:
    rewards = Rewards(
        [
            spec(kind="exact_match", column="answer"),
            spec(kind="regex", pattern="^[A-Z]+$", weight=0.5),
            spec(kind="contains", text="!"),
            spec(kind="length", min_chars=2, max_chars=3),
        ]
    )
    completions = [" CAT ", "cat!", "DOGS"]
    table = rewards.score(["p"] * 3, completions, [{"answer": "CAT"}] * 3, [1, 2, 3])
    assert table == [[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0]]
    assert [rewards.total(r) for r in table] == [1.0, 1.0, 0.5]


def test_user_function_gets_prompts_completions_and_columns(tmp_path) -> None:
    code = "def f(prompts, completions, answer, **kw):\n    return [float(len(p) + len(c)) for p, c in zip(prompts, completions)]\n"
    (tmp_path / "r.py").write_text(code)
    rewards = Rewards([spec(kind="function", function=f"{tmp_path / 'r.py'}:f")])
    assert rewards.score(["ab", "c"], ["x", "yz"], [{"answer": 1}, {"answer": 2}], [1, 2]) == [[3.0], [3.0]]


@pytest.mark.parametrize(
    "body, message",
    [
        ("return [1.0]", "returned 1 rewards for 2 completions"),
        ("return [1.0, float('nan')]", "gave nan for a completion of data row 8"),
        ("return [1.0, 'x']", "gave 'x' for a completion of data row 8"),
        ("raise KeyError('oops')", "f failed on data row 7: KeyError"),
    ],
)
def test_bad_user_reward_names_the_row(tmp_path, body: str, message: str) -> None:
    (tmp_path / "r.py").write_text(f"def f(prompts, completions, **kw):\n    {body}\n")
    rewards = Rewards([spec(kind="function", function=f"{tmp_path / 'r.py'}:f", name="f")])
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        rewards.score(["p", "p"], ["a", "b"], [{}, {}], [7, 8])


def test_mistakes_end_with_one_line(tmp_path, prompts) -> None:
    """num_generations < 2, a missing answer column, reward code that does not import."""
    too_few = grpo_recipe(tmp_path, prompts, [{"kind": "contains", "text": "A"}], "a", num_generations=1)
    assert "grpo.num_generations" in one_error_line(run_cli("validate", str(too_few)))
    no_column = grpo_recipe(tmp_path, prompts, [{"kind": "exact_match", "column": "gold"}], "b")
    assert "`gold`" in one_error_line(run_cli("validate", str(no_column)))
    (tmp_path / "bad.py").write_text("import no_such_module_here\n")
    bad = grpo_recipe(tmp_path, prompts, [{"kind": "function", "function": "bad.py:f"}], "c")
    line = one_error_line(run_cli("validate", str(bad)))
    assert "bad.py failed" in line and "no_such_module_here" in line
    none = grpo_recipe(tmp_path, prompts, [], "d")
    assert "grpo.rewards" in one_error_line(run_cli("validate", str(none)))


def test_a_short_run_logs_rewards_and_samples_alike_when_run_again(tmp_path, prompts, capsys) -> None:
    """Two steps: every metric the issue names is logged; the same seed samples the same
    completions (sampling is seeded per step, the way a resumed run needs it)."""
    rewards = [{"kind": "regex", "pattern": "[A-Z]", "name": "caps"}, {"kind": "exact_match", "weight": 2.0}]
    runs = []
    for name in ("one", "two"):
        recipe = grpo_recipe(tmp_path, prompts, rewards, name, beta=0.04)
        code, _, err = cli("train", str(recipe), capsys=capsys)
        assert code == 0, err[-2000:]
        runs.append([json.loads(line) for line in (tmp_path / name / "metrics.jsonl").open()])
    rows = runs[0]
    for key in (
        "reward",
        "reward_caps",
        "reward_exact_match",
        "reward_std",
        "kl",
        "completion_length",
        "clip_fraction",
    ):
        assert key in rows[0], rows[0]
    # Each step the reward is a weighted sum of the two; each completion has 1..max_new_tokens tokens.
    # Tolerance: float64 means of 4 rewards each, summed in another order (a few roundings of 1e-16).
    assert rows[0]["reward"] == pytest.approx(
        rows[0]["reward_caps"] + 2 * rows[0]["reward_exact_match"], abs=1e-12
    )
    assert 1 <= rows[0]["completion_length"] <= 4
    assert "eval_reward" in rows[-1] and "eval_reward_greedy" in rows[-1]
    for run in runs:
        for row in run:
            row.pop("tokens_per_s", None)  # wall time
    assert runs[0] == runs[1]


CAPITALS = (
    "def capitals(prompts, completions, answer, **kw):\n"
    "    return [sum(c.isupper() for c in x[: len(a)]) / len(a) for x, a in zip(completions, answer)]\n"
)


def test_a_reward_a_random_model_scores_low_rises(tmp_path, capsys) -> None:
    """A byte-level random model writes about 1 capital in 10 characters; 40 GRPO steps make its
    answers capitals (the README's numbers come from recipes/rl/grpo.yaml, this setup)."""
    (tmp_path / "caps.py").write_text(CAPITALS)
    recipe = write_recipe(
        tmp_path / "learn.yaml",
        peft={"r": 16, "alpha": 32, "target_modules": "all-linear"},
        data={"train": str(Path(__file__).parent.parent / "data/rl/train.jsonl"), "eval": 0.0, "max_length": 64},
        training={"objective": "grpo", "max_steps": 40, "batch_size": 4, "lr": 5e-3, "warmup_ratio": 0.0,
                  "log_every": 5, "output_dir": str(tmp_path / "learn")},
        grpo={"num_generations": 8, "max_new_tokens": 8, "rewards": [{"kind": "function", "function": "caps.py:capitals"}]},
    )  # fmt: skip
    code, _, err = cli("train", str(recipe), capsys=capsys)
    assert code == 0, err[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "learn" / "metrics.jsonl").open()]
    assert rows[0]["reward"] < 0.3 and rows[-1]["reward"] > 0.8, [r["reward"] for r in rows]


def test_sigkill_then_resume_samples_and_trains_as_uninterrupted(tmp_path, prompts, capsys) -> None:
    from .test_resume import EVERY, kill_after_first_checkpoint

    steps = 2 * EVERY
    settings = {"max_steps": steps, "save_every": EVERY, "log_every": 1, "lr": 1e-3}

    def recipe(name: str) -> Path:
        import yaml

        path = grpo_recipe(tmp_path, prompts, [{"kind": "regex", "pattern": "[A-Z]"}], name)
        raw = yaml.safe_load(path.read_text())
        raw["training"].update(settings)
        raw["data"]["eval"] = 0.0
        path.write_text(yaml.safe_dump(raw))
        return path

    run = tmp_path / "run"
    assert kill_after_first_checkpoint(recipe("run"), run) < steps
    code, _, err = cli("train", str(recipe("run")), "--resume", capsys=capsys)
    assert code == 0, err[-2000:]
    assert cli("train", str(recipe("whole")), capsys=capsys)[0] == 0
    got, want = ([json.loads(x) for x in (tmp_path / n / "metrics.jsonl").open()] for n in ("run", "whole"))
    assert [r["step"] for r in got] == list(range(1, steps + 1))
    for row in got + want:
        row.pop("tokens_per_s")  # wall time
    # The same samples and the same updates, bit for bit: resuming replays the same kernels on the
    # same seeded samples (an RNG not restored would sample other completions: other rewards).
    assert got == want


@pytest.mark.slow  # `make test-all`: test_grpo_sampling.py's 2 processes == 1 crosses an uneven epoch too
def test_two_processes_count_each_prompt_once(tmp_path, prompts, capsys) -> None:
    """12 prompts on 2 processes × 5 per micro-batch: Accelerate repeats 8 prompts to even out
    the epoch's last round; they are sampled (every process takes part) but count nothing."""
    recipe = grpo_recipe(tmp_path, prompts, [{"kind": "regex", "pattern": "[A-Z]"}], "two")
    code, _, err = cli(
        "train", str(recipe), "training.batch_size=5", "training.log_every=2", "--num-processes", "2",
        capsys=capsys,
    )  # fmt: skip
    assert code == 0, err[-2000:]
    summary = json.loads((tmp_path / "two" / "eval.json").read_text())["train"]
    assert summary["steps"] == 2 and summary["completions"] == 12 * 2, summary


def test_chat_prompts_render_with_the_template_and_estimate_plans_the_groups(tmp_path) -> None:
    """A messages prompt ends with the template's generation prompt (the model writes the turn);
    `estimate` counts each prompt's group of answers."""
    from peftcli.data.cache import prepare
    from peftcli.model.load import load_tokenizer
    from peftcli.recipe_file import load_recipe

    rows = [{"prompt": [{"role": "user", "content": f"say {w}"}], "answer": w.upper()} for w in WORDS]
    train = write_jsonl(tmp_path / "chat.jsonl", rows)
    recipe_path = grpo_recipe(tmp_path, train, [{"kind": "exact_match"}], "chat", num_generations=3)
    recipe = load_recipe(recipe_path)
    tokenizer = load_tokenizer(recipe.model)
    data = prepare(recipe.data, tokenizer, 0, "causal_lm", "grpo")
    example = data.train.examples[0]
    text = tokenizer.apply_chat_template(example["prompt"], tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(example["input_ids"]) == text and example["columns"] == {
        "answer": example["columns"]["answer"]
    }
    out = run_cli("estimate", str(recipe_path))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "batch 2 prompts = 6 sequences × 52 tokens" in out.stdout, out.stdout


@pytest.mark.parametrize("loss_type, scale", [("grpo", "batch"), ("dr_grpo", "none")])
def test_other_loss_types_and_scalings_train(tmp_path, prompts, capsys, loss_type: str, scale: str) -> None:
    rewards = [{"kind": "length", "min_chars": 2, "max_chars": 6}]
    recipe = grpo_recipe(tmp_path, prompts, rewards, "o", loss_type=loss_type, scale_rewards=scale)
    code, _, err = cli("train", str(recipe), capsys=capsys)
    assert code == 0, err[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "o" / "metrics.jsonl").open() if '"loss"' in line]
    assert len(rows) == 2 and all(0 <= r["reward"] <= 1 for r in rows), rows
