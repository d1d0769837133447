"""`eval --harness` scores prompt-learning adapters as they trained (peftcli/harness_lm.py).

The reference is the definition: a log-likelihood is the sum of the continuation's log-probs from
the PEFT model's forward pass (one unpadded row, the virtual tokens' positions dropped); a
generated answer is peftcli's `methods.generation.generate`, greedy, on the prompt alone. lm-eval
0.4.13's own HFLM already gets the first right within the model's length (tested here, so a later
lm-eval that breaks it is caught); it breaks past that length and in generate_until tasks, where
peftcli's TrainedLM must differ from it. Adapters are used as PEFT initialises them: random
virtual tokens and prefixes already change every answer.
"""

from __future__ import annotations

import json

import pytest
import torch

from .conftest import ROOT, cli, run_cli, write_recipe

pytest.importorskip("lm_eval", reason="lm-eval is the optional `harness` extra (pip install '.[harness]')")
pytestmark = pytest.mark.usefixtures("one_thread")

VIRTUAL = 4


def adapter(model_name: str, kind: str):
    import peft
    import transformers

    from peftcli.model import builtin

    configs = {
        "prompt": lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL),
        "p-tuning": lambda: peft.PromptEncoderConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL, encoder_hidden_size=32
        ),
        "prefix": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL),
    }
    path = builtin.resolve(f"builtin:{model_name}")
    tok = transformers.AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return tok, peft.get_peft_model(model, configs[kind]()).eval()


def lms(model, tok, batch_size: int = 4):
    """(peftcli's TrainedLM, lm-eval's own HFLM) on the same model."""
    from lm_eval.models.huggingface import HFLM

    from peftcli.harness_lm import TrainedLM

    return tuple(
        cls(pretrained=model, tokenizer=tok, backend="causal", batch_size=batch_size)
        for cls in (TrainedLM, HFLM)
    )


def loglikelihoods(lm, pairs) -> list[float]:
    from lm_eval.api.instance import Instance

    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    return [value for value, _ in lm.loglikelihood(requests, disable_tqdm=True)]


@torch.no_grad()
def by_hand(model, lm, context: str, continuation: str) -> float:
    """The continuation's log-prob from one unpadded forward pass, as training computes it:
    the last `lm.max_length` tokens, logits of the virtual tokens dropped."""
    ctx, cont = lm._encode_pair(context, continuation)
    ids = torch.tensor([(ctx + cont)[-(lm.max_length + 1) : -1]], device=model.device)
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].float()
    logprobs = torch.log_softmax(logits[logits.shape[0] - ids.shape[1] :], -1)[-len(cont) :]
    return float(logprobs[torch.arange(len(cont)), torch.tensor(cont)].sum())


# Four choices of one context (lm-eval shares their forward pass) and rows of other lengths
# (right-padded in one batch).
PAIRS = [
    ("Uppercase: cat\n", "CAT"),
    ("Uppercase: cat\n", "cat"),
    ("Uppercase: cat\n", "TAC"),
    ("Uppercase: horse\n", "HORSE"),
    ("Hi", " there, friend"),
]


@pytest.mark.parametrize("kind", ["prompt", "p-tuning", "prefix"])
def test_loglikelihood_is_the_forward_pass_without_virtual_tokens(kind):
    tok, model = adapter("tiny-llama", kind)
    ours, theirs = lms(model, tok)
    got = loglikelihoods(ours, PAIRS)
    hand = [by_hand(model, ours, c, x) for c, x in PAIRS]
    # float32 (eps 1.2e-7): the padded batch (no attention mask, as lm-eval calls it) and the
    # one-row pass may sum in other orders; n*eps over the longest sum (the 261-word softmax)
    # is 3e-5 relative. The base's scores, or a position shifted by the virtual tokens, differ
    # from these by > 0.3 on sums of ~20-70 (> 4e-3 relative).
    assert got == pytest.approx(hand, rel=1e-4)
    assert loglikelihoods(theirs, PAIRS) == got  # lm-eval itself drops the virtual tokens' logits
    base = [by_hand(model.get_base_model(), ours, c, x) for c, x in PAIRS]
    assert min(abs(a - b) for a, b in zip(got, base, strict=True)) > 1e-3  # the adapter is scored


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_the_longest_input_leaves_room_for_the_virtual_tokens(kind):
    """GPT-2's positions are a table of 1024: lm-eval's own HFLM fills it with input and indexes
    past it; TrainedLM cuts the input (from the left, as lm-eval does) to leave the virtual
    tokens their positions."""
    tok, model = adapter("tiny-gpt2", kind)
    ours, theirs = lms(model, tok, batch_size=1)
    positions = model.get_base_model().config.n_positions
    assert (ours.max_length, theirs.max_length) == (positions - VIRTUAL, positions)
    pair = [("the quick brown fox jumps " * 50, "over the lazy dog")]
    with pytest.raises(IndexError):
        loglikelihoods(theirs, pair)
    # float32 as above, the longest sum now attention's over 1020 positions: n*eps = 1.2e-4.
    assert loglikelihoods(ours, pair) == pytest.approx([by_hand(model, ours, *pair[0])], rel=1e-3)


WORDS = ["ox", "cat", "bird", "horse"]  # prompts of four lengths: each its own group, never padded


def generation_task(folder, until: list[str], more: str = "") -> dict:
    """A generate_until task file in `folder` (its config returned): WORDS to uppercase,
    `more` other generation_kwargs lines."""
    rows = "".join(json.dumps({"word": w, "answer": w.upper()}) + "\n" for w in WORDS)
    (folder / "gen.jsonl").write_text(rows)
    task = f"""
task: pl_generate
dataset_path: json
dataset_kwargs:
  data_files:
    test: gen.jsonl
test_split: test
output_type: generate_until
doc_to_text: "Uppercase: {{{{word}}}}\\n"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: {json.dumps(until)}
  max_gen_toks: 6
  do_sample: false
{more}metric_list:
  - metric: exact_match
"""
    (folder / "gen.yaml").write_text(task)
    from peftcli.harness import file_config

    return file_config(folder / "gen.yaml")


def answers(lm, spec) -> dict[str, str]:
    import lm_eval

    from peftcli.harness import task_manager

    output = lm_eval.simple_evaluate(
        model=lm, tasks=[spec], task_manager=task_manager([spec]), log_samples=True
    )
    return {s["doc"]["word"]: s["resps"][0][0] for s in output["samples"]["pl_generate"]}


def cut(text: str, until: list[str]) -> str:
    for stop in until:
        text = text.split(stop)[0]
    return text


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_generated_answers_are_peftcli_generate(kind, tmp_path):
    """The harness's answers are `generate`'s, greedy, on each prompt alone, cut at the stop
    sequences; a stop sequence that appears ends the row early without changing its answer.
    lm-eval's own HFLM (HF generate) answers otherwise."""
    from peftcli.methods.generation import generate

    tok, model = adapter("tiny-llama", kind)
    ours, theirs = lms(model, tok)
    whole = {}
    for word in WORDS:
        ids, mask = ours.tok_batch_encode([f"Uppercase: {word}\n"])
        out = generate(model, ids, mask, 6, tok.pad_token_id, eos_token_id=tok.eos_token_id)
        whole[word] = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    # A stop sequence the answers hold: a printable character one of them has after its first.
    stop = next(c for text in whole.values() for c in text[1:] if c.isascii() and c.isprintable())
    until = ["\n", stop]
    expected = {word: cut(text, until) for word, text in whole.items()}
    assert any(expected[w] != whole[w] for w in WORDS)  # the stop sequence cuts some answer
    spec = generation_task(tmp_path, until)
    assert answers(ours, spec) == expected
    assert answers(theirs, spec) != expected


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_a_seq2seq_models_answers_are_peftcli_generate(kind, tmp_path):
    """The same for an encoder-decoder (tiny-t5): the answer is the decoder's, after its start
    token, as `generate` gives it for the prompt alone. lm-eval asks a seq2seq model for
    `max_length` = the batch's prompt length + max_gen_toks decoder tokens (HF generate's
    meaning), start included."""
    import peft
    import transformers

    from peftcli.harness_lm import TrainedLM
    from peftcli.methods.generation import generate
    from peftcli.model import builtin

    path = builtin.resolve("builtin:tiny-t5")
    tok = transformers.AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    base = transformers.AutoModelForSeq2SeqLM.from_pretrained(path, dtype=torch.float32)
    config = {"prompt": peft.PromptTuningConfig, "prefix": peft.PrefixTuningConfig}[kind]
    model = peft.get_peft_model(base, config(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=VIRTUAL)).eval()
    ours = TrainedLM(pretrained=model, tokenizer=tok, backend="seq2seq", batch_size=4)
    # The four prompts are one batch: each gets the longest prompt's max_length.
    longest = ours.tok_batch_encode([f"Uppercase: {w}\n" for w in WORDS])[0].shape[1]
    expected = {}
    for word in WORDS:
        ids, mask = ours.tok_batch_encode([f"Uppercase: {word}\n"])
        out = generate(model, ids, mask, longest + 6 - 1, tok.pad_token_id, eos_token_id=tok.eos_token_id)
        expected[word] = cut(tok.decode(out[0, 1:], skip_special_tokens=True), ["\n"])
    assert answers(ours, generation_task(tmp_path, ["\n"])) == expected


@pytest.fixture(scope="module")
def prompt_tuning_run(tmp_path_factory):
    """A 2-step prompt-tuning run, scored by `peftcli eval --harness` in a fresh process on the
    shipped log-likelihood task and a generate_until task, with the base beside it."""
    root = tmp_path_factory.mktemp("harness-pl")
    lines = (ROOT / "data" / "quickstart" / "train.jsonl").read_text().splitlines()[:64]
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    recipe = write_recipe(
        root / "recipe.yaml",
        peft={"method": "prompt-tuning", "options": {"num_virtual_tokens": 8}},
        data={"train": str(root / "train.jsonl"), "format": "completion"},
        training={"max_steps": 2, "batch_size": 16, "lr": 0.03},
    )
    assert run_cli("train", str(recipe)).returncode == 0
    generation_task(root, ["\n"])
    tasks = f"{ROOT / 'data' / 'harness' / 'uppercase.yaml'},{root / 'gen.yaml'}"
    proc = run_cli("eval", str(root / "run"), "--harness", tasks, "--compare-base", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"root": root, "printed": json.loads(proc.stdout), "tasks": tasks}


def test_eval_harness_scores_a_prompt_tuning_run_as_trained(prompt_tuning_run):
    """The CLI on a real run: the log-likelihood task's numbers, adapter and base, are lm-eval's
    own `hf` model's with the model_args eval.json records; eval.json says where that model
    would differ (generate_until, the longest inputs)."""
    import lm_eval

    from peftcli.harness import file_config, task_manager

    printed = prompt_tuning_run["printed"]
    evals = json.loads((prompt_tuning_run["root"] / "run" / "eval.json").read_text())["harness"]
    assert (
        set(evals) == set(printed["adapter"]) == set(printed["base"]) == {"peftcli_uppercase", "pl_generate"}
    )
    config = evals["peftcli_uppercase"]["config"]
    assert "PROMPT_TUNING" in config["hf_model_differs"] and "8 virtual tokens" in config["hf_model_differs"]
    assert printed["adapter"]["pl_generate"]["samples"] == 4
    spec = file_config(ROOT / "data" / "harness" / "uppercase.yaml")
    base_args = ",".join(p for p in config["model_args"].split(",") if not p.startswith("peft="))
    for side, args in (("adapter", config["model_args"]), ("base", base_args)):
        direct = lm_eval.simple_evaluate(
            model="hf",
            model_args=args,
            tasks=[spec],
            task_manager=task_manager([spec]),
            batch_size=config["batch_size"],
            device=config["device"],
        )["results"]["peftcli_uppercase"]
        # The same model, requests and batches: the same computation, compared exactly.
        assert printed[side]["peftcli_uppercase"]["acc"] == direct["acc,none"], side
        assert printed[side]["peftcli_uppercase"]["acc_norm"] == direct["acc_norm,none"], side


def test_a_generation_setting_peftcli_does_not_decode_is_one_error_line(prompt_tuning_run, tmp_path, capsys):
    # In this process (the fixture's CLI run proves the fresh-process path; this, the refusal).
    generation_task(tmp_path, ["\n"], more="  num_beams: 4\n")
    run = str(prompt_tuning_run["root"] / "run")
    code, _, err = cli("eval", run, "--harness", str(tmp_path / "gen.yaml"), capsys=capsys)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and "Traceback" not in err and len(errors) == 1, err[-3000:]
    assert "num_beams" in errors[0] and "PROMPT_TUNING" in errors[0]
