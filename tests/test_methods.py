"""The method grid, PEFT-style: METHODS × builtin models. Every case trains a few steps through
the real pipeline with falling loss, saves, merges (where the method merges) to the same
outputs, and reloads with plain PEFT in a fresh process to the same outputs."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from peftcli.errors import UserError
from peftcli.methods import METHODS
from peftcli.recipe_file import load_recipe
from peftcli.training.run import train

from .conftest import write_jsonl, write_recipe

HERE = Path(__file__).resolve().parent
MODELS = {  # builtin model -> task, data file
    "tiny-llama": ("causal_lm", "completion"),
    "tiny-gpt2": ("causal_lm", "completion"),
    "tiny-t5": ("seq2seq_lm", "completion"),
    "tiny-bert": ("seq_cls", "classification"),
}
# Prompt-learning methods train a handful of embeddings and want a larger step.
LR = {
    "prompt-tuning": 0.2,
    "prefix-tuning": 0.05,
    "p-tuning": 0.02,
    "llama-adapter": 0.1,
    "vera": 0.05,
    "adalora": 0.03,
    "ia3": 0.05,
    # ... except where they share the step with a freshly initialised classification head.
    ("tiny-bert", "prompt-tuning"): 0.01,
    ("tiny-bert", "prefix-tuning"): 0.01,
}
# Pairs peftcli refuses by its own rules, whatever the installed versions: the error says so.
ALWAYS_REFUSED = {
    ("tiny-gpt2", "loha"): "Conv1D",
    ("tiny-gpt2", "lokr"): "Conv1D",
    ("tiny-gpt2", "oft"): "Conv1D",
    ("tiny-t5", "llama-adapter"): "does not support model.task",
    ("tiny-bert", "llama-adapter"): "model.task",
}
METHOD_NAMES = [m for m in METHODS if m != "qlora"]  # qlora = lora + 4-bit: see test_train
CASES = [(model, method) for model in MODELS for method in METHOD_NAMES]
IDS = [f"{m}-{x}" for m, x in CASES]


def refusal(model_name: str, method: str) -> str | None:
    """peftcli's refusal of the pair, from the same rule `validate` and `train` apply (None when
    it trains). Some refusals follow the installed libraries (prefix tuning needs a model that
    takes `past_key_values`), so a new release moves a pair between the two expectations."""
    from peftcli.methods.apply import check_fit
    from peftcli.model import builtin
    from peftcli.recipe import PeftSection

    task = MODELS[model_name][0]
    config = json.loads((Path(builtin.materialise(model_name)) / "config.json").read_text())
    try:
        check_fit(METHODS[method], PeftSection(method=method), task, config["model_type"], False)
    except UserError as exc:
        return str(exc)
    return None


PROBE = torch.tensor([list(range(40, 60)), list(range(60, 80))])


def probe(model, task: str) -> torch.Tensor:
    """The model's logits on a fixed input, on the model's device; returned on the CPU."""
    model.eval()
    ids = PROBE.to(next(model.parameters()).device)
    with torch.no_grad():
        kwargs = {"decoder_input_ids": ids[:, :5]} if task == "seq2seq_lm" else {}
        return model(input_ids=ids, **kwargs).logits.float().cpu()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("grid-data")
    words = [f"{a}{b}{c}" for a in "abcd" for b in "efg" for c in "hi"][:20]
    write_jsonl(root / "completion.jsonl", [{"prompt": f"Up: {w}\n", "completion": w.upper()} for w in words])
    write_jsonl(
        root / "classification.jsonl",
        [
            {"text": w.upper() if i % 2 else w, "label": "upper" if i % 2 else "lower"}
            for i, w in enumerate(words)
        ],
    )
    return root


@pytest.fixture(scope="module")
def grid(data_dir, tmp_path_factory) -> dict[tuple[str, str], dict]:
    """Train every case once; keep what the tests check (not the models)."""
    out = {}
    for model_name, method in CASES:
        task, fmt = MODELS[model_name]
        root = tmp_path_factory.mktemp(f"{model_name}-{method}")
        refused = refusal(model_name, method)
        recipe = load_recipe(
            write_recipe(
                root / "r.yaml",
                model={"name_or_path": f"builtin:{model_name}", "task": task},
                peft={"method": method, "r": 8},
                data={"train": str(data_dir / f"{fmt}.jsonl"), "eval": 0.2},
                training={
                    "max_steps": 6,
                    "batch_size": 16,
                    "lr": LR.get((model_name, method), LR.get(method, 0.01)),
                    "output_dir": str(root / "run"),
                    "eval_every": None,
                },
                eval={"metrics": ["loss"]},
            )
        )
        if refused:
            with pytest.raises(UserError) as caught:
                train(recipe)
            out[(model_name, method)] = {"refused": refused, "said": str(caught.value), "run": root / "run"}
            continue
        trained = train(recipe)
        model = trained.model
        case = {
            "run": trained.run_dir,
            "task": task,
            "logits": probe(model, task),
            "rows": [json.loads(x) for x in (trained.run_dir / "metrics.jsonl").read_text().splitlines()],
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        }
        if METHODS[method].merges:
            case["merged"] = probe(copy.deepcopy(model).merge_and_unload(), task)
        out[(model_name, method)] = case
    return out


def trained(grid: dict, pair: tuple[str, str]) -> dict:
    case = grid[pair]
    if "refused" in case:
        pytest.skip(f"refused (see test_case_trains_or_is_refused): {case['refused']}")
    return case


@pytest.mark.parametrize(("model_name", "method"), CASES, ids=IDS)
def test_case_trains_or_is_refused(grid, model_name, method):
    """A pair trains with falling loss and saves, or is refused before anything is written."""
    case = grid[(model_name, method)]
    if "refused" in case:
        assert case["said"] == case["refused"]
        assert not case["run"].exists()
        return
    losses = [r["loss"] for r in case["rows"] if "loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0], losses
    assert case["trainable"] > 0
    config = json.loads((case["run"] / "adapter" / "adapter_config.json").read_text())
    assert (
        config["task_type"]
        == {"causal_lm": "CAUSAL_LM", "seq2seq_lm": "SEQ_2_SEQ_LM", "seq_cls": "SEQ_CLS"}[case["task"]]
    )
    if model_name == "tiny-bert":  # the classification head is trained and saved with the adapter
        assert (case["run"] / "adapter" / "labels.json").is_file()
        assert "classifier" in json.dumps(config.get("modules_to_save"))


@pytest.mark.parametrize(
    ("model_name", "method"),
    [c for c in CASES if METHODS[c[1]].merges],
    ids=[f"{m}-{x}" for m, x in CASES if METHODS[x].merges],
)
def test_merged_model_equals_the_adapter(grid, model_name, method):
    case = trained(grid, (model_name, method))
    # float32 logits (|z| < 7): merging rounds W + ΔW to float32 once per weight (~6e-8
    # relative), moving logits by ~1e-5 (8e-6 the largest measured); 1e-4 is 10x that.
    assert torch.allclose(case["merged"], case["logits"], atol=1e-4), (
        (case["merged"] - case["logits"]).abs().max()
    )


def test_every_adapter_reloads_with_plain_peft_in_a_fresh_process(grid, tmp_path):
    done = {pair: c for pair, c in grid.items() if "refused" not in c}
    jobs = [
        {"adapter": str(c["run"] / "adapter"), "task": c["task"], "out": str(tmp_path / f"{m}-{x}.pt")}
        for (m, x), c in done.items()
    ]
    spec = tmp_path / "jobs.json"
    spec.write_text(json.dumps(jobs))
    proc = subprocess.run(
        [sys.executable, str(HERE / "reload_many.py"), str(spec)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for (m, x), c in done.items():
        theirs = torch.load(tmp_path / f"{m}-{x}.pt")
        # The same float32 weights in another process: equal up to kernels summing in another
        # order (4e-6 the largest measured, logits |z| < 7); 1e-4 is margin.
        assert torch.allclose(theirs, c["logits"], atol=1e-4), (
            f"{m}-{x}: {(theirs - c['logits']).abs().max()}"
        )


@pytest.mark.parametrize(
    ("model_name", "method"), list(ALWAYS_REFUSED), ids=[f"{m}-{x}" for m, x in ALWAYS_REFUSED]
)
def test_unsupported_pairs_are_refused_before_loading(tmp_path, data_dir, model_name, method):
    from peftcli.checks import check_recipe

    task, fmt = MODELS[model_name]
    recipe = load_recipe(
        write_recipe(
            tmp_path / "r.yaml",
            model={"name_or_path": f"builtin:{model_name}", "task": task},
            peft={"method": method},
            data={"train": str(data_dir / f"{fmt}.jsonl")},
        )
    )
    with pytest.raises(UserError, match=ALWAYS_REFUSED[(model_name, method)]):
        check_recipe(recipe)


# --------------------------------------------------------------------------- parameter counts

# tiny-llama: d=128, 4 layers, GQA with 2 KV heads of 32 (k/v out 64), SwiGLU width 352.
LAYER = {
    "q_proj": (128, 128),
    "k_proj": (128, 64),
    "v_proj": (128, 64),
    "o_proj": (128, 128),
    "gate_proj": (128, 352),
    "up_proj": (128, 352),
    "down_proj": (352, 128),
}
L, R, VIRTUAL = 4, 8, 16


def expected_params(method: str) -> int:
    mods = LAYER.values()
    per_layer = {
        "lora": sum(R * (i + o) for i, o in mods),
        "dora": sum(R * (i + o) + o for i, o in mods),  # + a magnitude per output
        "adalora": sum(R * (i + o) + R for i, o in mods),  # A, B and the singular values E
        "ia3": 64 + 64 + 352,  # one vector per target: k and v outputs, the FFN down projection's input
        "loha": sum(2 * R * (i + o) for i, o in mods),
        "vera": sum(o + R for i, o in mods),  # λ_b per output, λ_d per rank
        "oft": sum((i // 32) * 32 * 31 // 2 for i, o in mods),  # skew-symmetric 32×32 blocks
        "adapter": 2 * (2 * 128 * R + R + 128),  # 2·d·m + m + d after o_proj and down_proj
        "prefix-tuning": VIRTUAL * 2 * 64,  # a key and a value prefix per layer
        "llama-adapter": 10 * 128 + 1,  # adaption prompt + its zero-init gate
    }
    if method in per_layer:
        return L * per_layer[method]
    return {"prompt-tuning": VIRTUAL * 128, "p-tuning": VIRTUAL * 128 + 3 * (128 * 128 + 128)}[
        method
    ]  # embeddings + a 3-layer MLP encoder


@pytest.mark.parametrize("method", [m for m in METHOD_NAMES if m != "lokr"])
def test_trainable_parameters_match_the_methods_formula(method):
    """LoKr is left out: its count depends on PEFT's factorisation of each dimension."""
    from transformers import AutoModelForCausalLM

    import peftcli.methods.tuners  # noqa: F401  registers peftcli's own tuners with PEFT
    from peftcli.methods.apply import apply_method
    from peftcli.model import builtin
    from peftcli.recipe import PeftSection

    model = AutoModelForCausalLM.from_pretrained(builtin.materialise("tiny-llama"))
    section = PeftSection(method=method, r=R)
    peft_model = apply_method(model, section, "causal_lm", total_steps=10)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert trainable == expected_params(method)


def test_shipped_reference_shares_are_current():
    """`peftcli methods` shows shares from method_shares.json; recompute them on the meta device."""
    from peftcli.methods import reference

    shipped = reference.load()
    assert shipped == reference.compute(), (
        "run `python -m peftcli.methods.reference` to refresh method_shares.json"
    )


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_methods_on_a_4bit_base_train_or_are_refused(method, tmp_path, data_dir):
    """Quantization combines with every method that supports it; the others are refused early."""
    recipe = load_recipe(
        write_recipe(
            tmp_path / "r.yaml",
            model={"quantization": "4bit"},
            peft={"method": method},
            data={"train": str(data_dir / "completion.jsonl"), "eval": 0.0},
            training={"max_steps": 2, "batch_size": 8, "output_dir": str(tmp_path / "run")},
        )
    )
    if not METHODS[method].quantized_base:
        with pytest.raises(UserError, match="cannot train on a quantized base"):
            train(recipe)
        return
    trained = train(recipe)
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear4bit) for m in trained.model.modules())
    assert (trained.run_dir / "adapter" / "adapter_config.json").is_file()


def test_prompt_learning_options_pass_through():
    """Prompt tuning initialised from text (the tokenizer found from the model), P-tuning with
    an LSTM encoder: PEFT options reach the config, and the virtual tokens are what was asked."""
    from transformers import AutoModelForCausalLM

    import peftcli.methods.tuners  # noqa: F401  registers peftcli's own tuners with PEFT
    from peftcli.methods.apply import apply_method
    from peftcli.model import builtin
    from peftcli.recipe import PeftSection

    path = builtin.materialise("tiny-llama")
    text = "Uppercase the word"
    section = PeftSection(
        method="prompt-tuning",
        options={"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": text, "num_virtual_tokens": 18},
    )
    model = apply_method(AutoModelForCausalLM.from_pretrained(path), section, "causal_lm")
    config = model.peft_config["default"]
    assert config.tokenizer_name_or_path == str(path) and config.num_virtual_tokens == 18
    # Initialised from the text's token embeddings (repeated to fill the virtual tokens).
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(path)(text)["input_ids"][:18]  # PEFT keeps the BOS
    prompt = model.prompt_encoder["default"].embedding.weight
    assert torch.equal(prompt, model.get_input_embeddings().weight[ids])  # a copy: exact

    section = PeftSection(method="p-tuning", options={"encoder_reparameterization_type": "LSTM"})
    model = apply_method(AutoModelForCausalLM.from_pretrained(path), section, "causal_lm")
    assert isinstance(model.prompt_encoder["default"].lstm_head, torch.nn.LSTM)


@pytest.mark.parametrize("model_name", list(MODELS))
def test_prefix_tuning_rule_agrees_with_what_peft_does(model_name):
    """The rule that refuses prefix tuning is checked against PEFT itself on the installed
    versions: where it says yes, the prefixes change the outputs; where it says no, PEFT fails
    or ignores them."""
    from peft import PrefixTuningConfig, get_peft_model

    from peftcli.methods.apply import takes_past_key_values
    from peftcli.model import builtin
    from peftcli.tasks import TASKS

    task = MODELS[model_name][0]
    folder = builtin.materialise(model_name)
    model_type = json.loads((Path(folder) / "config.json").read_text())["model_type"]
    import transformers

    base = getattr(transformers, TASKS[task].auto_class).from_pretrained(folder)
    model = get_peft_model(
        base, PrefixTuningConfig(task_type=TASKS[task].peft_task_type, num_virtual_tokens=4)
    )
    model.eval()
    kwargs = {"decoder_input_ids": PROBE[:, :5]} if task == "seq2seq_lm" else {}
    with torch.no_grad():
        try:
            with_prefix = model(input_ids=PROBE, **kwargs).logits
        except (ValueError, TypeError):
            works = False
        else:
            with model.disable_adapter():
                plain = model(input_ids=PROBE, **kwargs).logits
            works = not torch.equal(with_prefix[..., -plain.shape[1] :, :], plain)
    assert works == takes_past_key_values(model_type, task)
