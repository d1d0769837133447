"""GRPO's sampling (objectives/sampling.py): the right distribution, one random stream per
completion (so micro-batches, batch composition and processes do not change what is sampled),
and 2 processes == 1 process in float64."""

from __future__ import annotations

import json
import math

import pytest
import torch

from peftcli.objectives.sampling import key_seed, sampling_processors
from tests.conftest import cli
from tests.test_grpo import grpo_recipe, prompts  # noqa: F401  (the fixture)


def nucleus(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The distribution sampling should draw from, computed directly: softmax(logits / T), cut
    to the smallest set of most likely tokens holding at least top_p, renormalised."""
    p = torch.softmax(logits.double() / temperature, -1)
    order = p.argsort(descending=True)
    before = torch.cumsum(p[order], 0) - p[order]  # mass of the likelier tokens
    keep = torch.zeros_like(p, dtype=torch.bool)
    keep[order[before < top_p]] = True
    return torch.where(keep, p, 0) / p[keep].sum()


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.8)])
def test_gumbel_max_samples_the_warped_softmax(temperature: float, top_p: float) -> None:
    """argmax(processed logits) over 20,000 rows, each with its own seed, has the frequencies of
    the exact distribution; tokens outside the nucleus are never drawn."""
    logits = torch.tensor([2.0, 1.5, 0.3, 0.0, -1.0, -3.0])
    n = 20_000
    seeds = [key_seed(7, 1, row, 0) for row in range(n)]
    processors = sampling_processors(seeds, temperature, top_p, torch.device("cpu"))
    scores = processors(torch.zeros((n, 1), dtype=torch.long), logits.repeat(n, 1))
    counts = torch.bincount(scores.argmax(-1), minlength=len(logits)).double()
    want = nucleus(logits, temperature, top_p)
    assert (counts[want == 0] == 0).all(), (counts, want)
    # Sampling error: each frequency is a mean of n Bernoulli(p) draws, standard error
    # sqrt(p(1-p)/n) ≤ 0.0036; 5 standard errors (seeded: the same draws on every CPU).
    tolerance = 5 * torch.sqrt(want * (1 - want) / n) + 1e-12
    assert ((counts / n - want).abs() <= tolerance).all(), (counts / n, want)


@pytest.mark.parametrize("method", ["lora", "prefix-tuning"])  # HF generate; peftcli's decoding
def test_a_completion_samples_the_same_whatever_shares_its_batch(prompts, method) -> None:  # noqa: F811
    """The same prompt row samples the same completions alone, with others, in another order
    (prefix tuning: peftcli decodes rows in groups of one length, each on its own stream)."""
    from peftcli.data.cache import prepare
    from peftcli.methods.apply import apply_method
    from peftcli.model.load import load_model, load_tokenizer
    from peftcli.objectives.build import build_objective
    from peftcli.recipe_file import load_recipe

    recipe = load_recipe(grpo_recipe(prompts.parent, prompts, [{"kind": "regex", "pattern": "[A-Z]"}]))
    recipe.model.dtype = "float64"
    recipe.peft.method = method
    tokenizer = load_tokenizer(recipe.model)
    data = prepare(recipe.data, tokenizer, 0, "causal_lm", "grpo")
    model = apply_method(load_model(recipe.model), recipe.peft, "causal_lm")
    objective = build_objective("grpo", "causal_lm", tokenizer, recipe.eval, None, False, recipe.grpo)
    examples = data.train.examples  # prompts of different lengths: other padding in each batch

    def completions(rows: list[int]) -> dict[int, list[str]]:
        prompts = objective.collate([examples[i] for i in rows])
        texts = objective.sample(model, prompts, 3, (42, 5))["texts"]
        return {r: texts[3 * k : 3 * k + 3] for k, r in enumerate(prompts["rows"])}

    together = completions([0, 1, 2, 3])
    alone = completions([2]) | completions([3, 0]) | completions([1])
    assert together == alone
    assert len({t for texts in together.values() for t in texts}) > 4  # really sampled
    assert (
        completions([0])[examples[0]["row"]]
        != objective.sample(model, objective.collate([examples[0]]), 3, (42, 6))["texts"]
    )  # the next step samples anew


def test_two_processes_and_accumulation_equal_one_process(tmp_path, prompts, capsys) -> None:  # noqa: F811
    """4 prompts per step as 1 process × 4, 1 process × 2 accumulated twice, and 2 processes × 2,
    float64, with the KL term, across an uneven epoch end (15 prompts: Accelerate repeats one on
    2 processes, sampled but counted as nothing): the same completions, so the same rewards,
    losses and weights."""
    from tests.test_preference import adapter, rows_of
    from tests.test_train import EXACT

    rewards = [{"kind": "regex", "pattern": "[A-Z]", "name": "caps"}, {"kind": "length", "max_chars": 6}]
    setups = {"one": (4, 1, 1), "accumulated": (2, 2, 1), "two": (2, 1, 2)}
    for name, (batch, accum, processes) in setups.items():
        recipe = grpo_recipe(tmp_path, prompts, rewards, name, beta=0.04, scale_rewards="batch")
        args = [f"training.batch_size={batch}", f"training.grad_accum={accum}", "training.max_steps=5", "data.eval=0.0625",
                "training.log_every=1", "training.lr=1e-2", "model.dtype=float64", "peft.dropout=0",
                "training.mixed_precision=\"no\""]  # fmt: skip
        code, _, err = cli("train", str(recipe), *args, "--num-processes", str(processes), capsys=capsys)
        assert code == 0, err[-2000:]
    one = rows_of(tmp_path / "one")
    assert one[-1]["epoch"] > 1 and len({r["reward"] for r in one}) > 1, one
    for other in ("accumulated", "two"):
        for a, b in zip(one, rows_of(tmp_path / other), strict=True):
            for key in (
                "loss",
                "reward",
                "reward_caps",
                "reward_std",
                "kl",
                "completion_length",
                "clip_fraction",
            ):
                # float64: equal up to metrics.jsonl's 6 decimals (neighbours are 1e-6 apart: 2e-6)
                assert a[key] == pytest.approx(b[key], abs=2e-6), (other, key, a, b)
        evals = [json.loads((tmp_path / n / "eval.json").read_text()) for n in ("one", other)]
        assert evals[0]["reward"] == evals[1]["reward"] and math.isfinite(evals[0]["reward"])
        assert evals[0]["train"]["completions"] == evals[1]["train"]["completions"] == 5 * 4 * 2 - 2
        a, b = adapter(tmp_path / "one"), adapter(tmp_path / other)
        # float64 weights: EXACT (its reason at its definition in test_train.py)
        for key in a:
            assert torch.allclose(a[key], b[key], rtol=0, atol=EXACT), (other, key)


@pytest.mark.parametrize("builtin", ["tiny-gpt2", "tiny-llama"])
def test_training_scores_the_completions_where_generation_wrote_them(builtin: str) -> None:
    """Left-padded prompts: the training forward's log-probabilities equal those `generate`
    sampled from (GPT-2's absolute positions must count from each row's first real token)."""
    from peftcli.methods.apply import apply_method
    from peftcli.model.load import load_model, load_tokenizer
    from peftcli.objectives.grpo import token_logps
    from peftcli.recipe import ModelSection, PeftSection

    section = ModelSection(name_or_path=f"builtin:{builtin}", dtype="float64")
    tokenizer, model = load_tokenizer(section), load_model(section)
    model = apply_method(model, PeftSection(method="lora"), "causal_lm")
    encoded = [tokenizer(t)["input_ids"] for t in ("Uppercase: cat\n", "Uppercase: a much longer prompt\n")]
    longest, pad = max(map(len, encoded)), tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (longest - len(e)) + e for e in encoded])
    mask = torch.tensor([[0] * (longest - len(e)) + [1] * len(e) for e in encoded])
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=pad,
        eos_token_id=None, output_logits=True, return_dict_in_generate=True,
    )  # fmt: skip
    completion = out.sequences[:, longest:]
    batch = {"prompt_ids": ids, "prompt_mask": mask, "completion_ids": completion,
             "completion_mask": torch.ones_like(completion)}  # fmt: skip
    logits = torch.stack(out.logits, 1).float()
    want = torch.gather(logits.log_softmax(-1), 2, completion.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        got = token_logps(model, batch, 1.0)
    # generate hands float32 logits (transformers casts them); both sides round float64 logits of
    # magnitude < 20 to float32 (~1e-6 each) before a float32 log-softmax: 1e-4 covers it, while
    # a wrong position moves log-probabilities by whole nats.
    assert torch.allclose(got, want, atol=1e-4, rtol=0), (got - want).abs().max()


@pytest.mark.parametrize("method", ["prompt-tuning", "p-tuning"])
def test_prompt_learning_scores_and_samples_each_row_as_it_stands_alone(method: str) -> None:
    """Prompt and p-tuning put their virtual tokens before the row and take no position ids, so
    in a left-padded batch a short prompt's pads would stand between them and its prompt (GPT-2:
    at other absolute positions). GRPO scores and samples every row as it stands unpadded, as
    `peftcli generate` decodes it afterwards."""
    from peftcli.methods.apply import apply_method
    from peftcli.model.load import load_model, load_tokenizer
    from peftcli.objectives.build import build_objective
    from peftcli.objectives.grpo import token_logps
    from peftcli.objectives.rl_section import GrpoSection
    from peftcli.recipe import EvalSection, ModelSection, PeftSection

    section = ModelSection(name_or_path="builtin:tiny-gpt2", dtype="float64")
    tokenizer, model = load_tokenizer(section), load_model(section)
    torch.manual_seed(0)
    model = apply_method(model, PeftSection(method=method), "causal_lm").eval()
    encoded = [tokenizer(t)["input_ids"] for t in ("Uppercase: cat\n", "Uppercase: a much longer prompt\n")]
    pad = tokenizer.pad_token_id

    def batch(rows: list[list[int]], completion: torch.Tensor) -> dict[str, torch.Tensor]:
        width = max(map(len, rows))
        return {
            "prompt_ids": torch.tensor([[pad] * (width - len(e)) + e for e in rows]),
            "prompt_mask": torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in rows]),
            "completion_ids": completion,
            "completion_mask": torch.ones_like(completion),
        }

    both = batch(encoded, torch.tensor([[70, 71, 72, 73], [80, 81, 82, 83]]))
    with torch.no_grad():
        together = token_logps(model, both, 1.0)
        alone = [
            token_logps(model, batch([e], both["completion_ids"][[r]]), 1.0)[0] for r, e in enumerate(encoded)
        ]
        padded = model(
            input_ids=torch.cat([both["prompt_ids"], both["completion_ids"]], 1),
            attention_mask=torch.cat([both["prompt_mask"], both["completion_mask"]], 1),
        ).logits[0, -5:-1]
    # float64 throughout: the same sums in another batch shape round alike to ~1e-15 relative;
    # a row scored at other positions moves its log-probabilities by far more (asserted below).
    for r in range(2):
        assert torch.allclose(together[r], alone[r], atol=1e-10, rtol=0), (r, together[r] - alone[r])
    shifted = torch.gather(padded.log_softmax(-1), 1, both["completion_ids"][0, :, None])[:, 0]
    assert (shifted - alone[0]).abs().max() > 1e-3, "the padded forward would score row 0 the same"
    # Sampling: GRPO's greedy completions of the padded batch are each row's completions alone.
    section = GrpoSection(max_new_tokens=6, rewards=[{"kind": "length"}])
    objective = build_objective("grpo", "causal_lm", tokenizer, EvalSection(), None, False, section)
    rows = [{"input_ids": e, "prompt": "", "columns": {}, "row": i} for i, e in enumerate(encoded)]
    sampled = objective.sample(model, objective.collate(rows), 1, None)["completion_ids"]
    for r, row in enumerate(rows):
        one = objective.sample(model, objective.collate([row]), 1, None)["completion_ids"][0]
        assert sampled[r, : len(one)].tolist() == one.tolist(), r
