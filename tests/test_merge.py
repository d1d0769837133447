"""`peftcli merge`: every mergeable method folds into a plain transformers folder with the
adapter's outputs; a quantized base is dequantized first; several LoRA adapters combine through
PEFT; what cannot or must not be merged is refused without leaving anything behind."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from bitsandbytes import functional as bnb_functional
from safetensors.torch import load_file

from peftcli.methods import METHODS
from peftcli.model import builtin
from peftcli.recipe_file import load_recipe
from peftcli.training.run import train

from .conftest import ROOT, cli, write_jsonl, write_recipe

MERGEABLE = [m for m, spec in METHODS.items() if spec.merges]
NOT_MERGEABLE = [m for m, spec in METHODS.items() if not spec.merges]
PROBE = torch.tensor([list(range(40, 60)), list(range(60, 80))])
LR = {"vera": 0.05, "adalora": 0.03, "ia3": 0.05}
# Merged against unmerged float32 logits (|z| < 7): merging rounds W + s·BA to float32 once per
# weight (~6e-8 relative), which through the layers moves logits by ~1e-5 (9e-6 the largest
# measured over all methods); atol 1e-4 (+ 1e-5·|z|) is 10x that. A merge that drops or
# mis-scales the update moves them by the trained update's whole effect instead.
MERGE_ATOL = 1e-4
# Other architectures and tasks, merged the same way (one LoRA run each).
EXTRA = {"t5-lora": ("tiny-t5", "seq2seq_lm"), "bert-lora": ("tiny-bert", "seq_cls")}


pytestmark = pytest.mark.usefixtures("one_thread")


def probe(model, task: str = "causal_lm") -> torch.Tensor:
    """The model's logits on a fixed input, on the model's device; returned on the CPU."""
    model.eval()
    ids = PROBE.to(next(model.parameters()).device)
    extra = {"decoder_input_ids": ids[:, :5]} if task == "seq2seq_lm" else {}
    with torch.no_grad():
        return model(input_ids=ids, **extra).logits.float().cpu()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("merge-data")
    lines = (ROOT / "data" / "quickstart" / "train.jsonl").read_text().splitlines()[:32]
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    rows = [json.loads(line) for line in lines]
    write_jsonl(
        root / "classes.jsonl",
        [{"text": r["prompt"], "label": "long" if len(r["completion"]) > 6 else "short"} for r in rows],
    )
    return root


def train_run(
    root: Path,
    data: Path,
    name: str,
    model="tiny-llama",
    task="causal_lm",
    steps=3,
    quantization="none",
    training=None,
    **peft,
):
    """A short run; `peft` holds the peft section (method=...), `training` extra training keys."""
    folder = root / name
    folder.mkdir()
    recipe = write_recipe(
        folder / "r.yaml",
        model={"name_or_path": f"builtin:{model}", "task": task}
        | ({"quantization": quantization} if quantization != "none" else {}),
        peft=peft,
        data={"train": str(data / ("classes.jsonl" if task == "seq_cls" else "train.jsonl")), "eval": 0.25},
        training={
            "max_steps": steps,
            "lr": LR.get(peft.get("method"), 3e-3),
            "output_dir": str(folder / "run"),
            **(training or {}),
        },
    )
    return train(load_recipe(recipe))


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory) -> dict[str, dict]:
    """A short tiny-llama run per mergeable method (and LoRA on T5 and BERT), with the
    adapter's probe logits taken in memory, right after training."""
    root = tmp_path_factory.mktemp("merge-runs")
    cases = {m: ("tiny-llama", "causal_lm", m) for m in MERGEABLE}
    cases |= {name: (model, task, "lora") for name, (model, task) in EXTRA.items()}
    out = {}
    for name, (model, task, method) in cases.items():
        trained = train_run(root, data, name, model, task, method=method)
        out[name] = {"run": trained.run_dir, "task": task, "logits": probe(trained.model, task)}
    return out


@pytest.fixture(scope="module")
def merged(runs, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("merged")
    out = {}
    for name, case in runs.items():
        code, _, _ = cli("merge", str(case["run"]), "-o", str(root / name))
        assert code == 0, name
        out[name] = root / name
    return out


def auto_class(task: str):
    import transformers

    from peftcli.tasks import TASKS

    return getattr(transformers, TASKS[task].auto_class)


def test_every_mergeable_method_merges_to_the_adapters_outputs(runs, merged):
    for name, case in runs.items():
        model = auto_class(case["task"]).from_pretrained(merged[name])
        logits = probe(model, case["task"])
        assert torch.allclose(logits, case["logits"], atol=MERGE_ATOL), (  # merged: see MERGE_ATOL
            f"{name}: {(logits - case['logits']).abs().max()}"
        )
        # A plain transformers folder: weights, config, tokenizer (+ chat template), generation config.
        files = {p.name for p in merged[name].iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files, name
        assert not any(f.startswith("adapter") for f in files), name
    llama = merged["lora"]
    assert (llama / "chat_template.jinja").read_text() == builtin.CHATML_TEMPLATE
    generation = json.loads((llama / "generation_config.json").read_text())
    assert sorted(generation["eos_token_id"]) == [257, 260]  # </s> and <|im_end|>
    labels = json.loads((runs["bert-lora"]["run"] / "adapter" / "labels.json").read_text())
    config = json.loads((merged["bert-lora"] / "config.json").read_text())
    assert config["id2label"] == {str(i): n for i, n in enumerate(labels)} == {"0": "long", "1": "short"}


def test_merged_folders_load_in_a_fresh_process_with_transformers_only(runs, merged, tmp_path):
    """One subprocess for every folder: no peftcli, no PEFT, same logits."""
    jobs = [
        {"dir": str(merged[n]), "task": c["task"], "out": str(tmp_path / f"{n}.pt")} for n, c in runs.items()
    ]
    code = f"""
import json, sys, torch, transformers
PROBE = torch.tensor({PROBE.tolist()})
CLASSES = {{"causal_lm": "AutoModelForCausalLM", "seq2seq_lm": "AutoModelForSeq2SeqLM",
           "seq_cls": "AutoModelForSequenceClassification"}}
for job in json.loads(sys.argv[1]):
    model = getattr(transformers, CLASSES[job["task"]]).from_pretrained(job["dir"]).eval()
    extra = {{"decoder_input_ids": PROBE[:, :5]}} if job["task"] == "seq2seq_lm" else {{}}
    with torch.no_grad():
        torch.save(model(input_ids=PROBE, **extra).logits.float(), job["out"])
    tok = transformers.AutoTokenizer.from_pretrained(job["dir"])
    assert tok("x")["input_ids"], job
leaked = [m for m in ("peft", "peftcli", "bitsandbytes") if m in sys.modules]
assert not leaked, leaked
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(jobs)], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name, case in runs.items():
        theirs = torch.load(tmp_path / f"{name}.pt")
        assert torch.allclose(theirs, case["logits"], atol=MERGE_ATOL), (  # merged: see MERGE_ATOL
            f"{name}: {(theirs - case['logits']).abs().max()}"
        )


def test_dtype_option_sets_the_saved_dtype(runs, tmp_path):
    code, _, _ = cli("merge", str(runs["lora"]["run"]), "-o", str(tmp_path / "bf16"), "--dtype", "bfloat16")
    assert code == 0
    assert {t.dtype for t in load_file(tmp_path / "bf16" / "model.safetensors").values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    report = json.loads((tmp_path / "bf16" / "merge_report.json").read_text())
    assert report["dtype"] == "bfloat16" and report["method"] == "lora" and report["dequantized"] is None
    # The merged folder's card parses with huggingface_hub and says what the folder is.
    from huggingface_hub import ModelCard

    meta = ModelCard.load(tmp_path / "bf16" / "README.md").data.to_dict()
    assert meta["library_name"] == "transformers" and {"peftcli", "lora", "merged"} <= set(meta["tags"])


# --------------------------------------------------------------------------- quantized bases


def loss_on(model, run_dir: Path) -> float:
    """The eval loss the merge report should have measured, recomputed independently."""
    from peftcli.data import prepare
    from peftcli.model.load import load_tokenizer
    from peftcli.recipe import TrainingSection
    from peftcli.training.accelerator import make_accelerator
    from peftcli.training.evaluate import loss_metrics

    recipe = load_recipe(run_dir / "recipe.yaml")
    tokenizer = load_tokenizer(recipe.model)
    split = prepare(recipe.data, tokenizer, recipe.training.seed).eval
    accelerator = make_accelerator(TrainingSection(report_to=["jsonl"]), Path("."))
    return loss_metrics(model, split, "causal_lm", accelerator, 8, tokenizer.pad_token_id)["loss"]


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_quantized_base_is_dequantized_before_merging(runs, merged, data, tmp_path, quantization, capsys):
    from peft import PeftModel

    from peftcli.model.load import load_model

    if quantization == "4bit":
        run_dir, out = runs["qlora"]["run"], merged["qlora"]
    else:
        run_dir = train_run(tmp_path, data, "lora-8bit", method="lora", quantization="8bit").run_dir
        out = tmp_path / "merged-8bit"
        code, _, err = cli("merge", str(run_dir), "-o", str(out), capsys=capsys)
        assert (
            code == 0 and "dequantized 28 8bit layers" in err and "eval loss on the run's eval split" in err
        )
    recipe = load_recipe(run_dir / "recipe.yaml")
    adapter = str(run_dir / "adapter")
    report = json.loads((out / "merge_report.json").read_text())
    assert report["dequantized"] == quantization and report["dtype"] == "float32"

    quantized_base = load_model(recipe.model, device="cpu")
    # What the quantized layer computes with: its weight dequantized (bitsandbytes' own routines).
    layer = quantized_base.get_submodule("model.layers.0.self_attn.q_proj")
    if quantization == "4bit":
        dequantized = bnb_functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    else:
        dequantized = layer.weight.data.float() * layer.weight.SCB[:, None] / 127
    a, b, scaling = lora_factors(run_dir)["model.layers.0.self_attn.q_proj.weight"]
    ours = load_file(out / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"]
    original = load_file(builtin.materialise("tiny-llama") / "model.safetensors")[
        "model.layers.0.self_attn.q_proj.weight"
    ]
    # float32 weights (|w| < 0.4, 1 ulp = 3e-8): the same sum, maybe in another order (3e-8
    # measured); 1e-6 is 30 ulp, far below the 4-bit quantization error checked next (> 1e-3).
    assert torch.allclose(ours, dequantized.float() + scaling * b @ a, atol=1e-6)
    assert (ours - (original + scaling * b @ a)).abs().max() > 1e-3  # not the checkpoint's weight

    on_quantized = PeftModel.from_pretrained(quantized_base, adapter).eval()
    result = auto_class("causal_lm").from_pretrained(out).eval()
    naive_base = load_model(recipe.model.model_copy(update={"quantization": "none", "dtype": "float32"}))
    naive = PeftModel.from_pretrained(naive_base, adapter).merge_and_unload().eval()
    adapter_loss, merged_loss, naive_loss = (loss_on(m, run_dir) for m in (on_quantized, result, naive))
    # The report's losses are the same float32 eval (same batches, kernels, float64 sum) of the
    # same models: equal to rounding, ~1e-7 of a loss ~6 (0 measured); 1e-6 is margin.
    assert report["eval"]["adapter_loss"] == pytest.approx(adapter_loss, abs=1e-6)
    assert report["eval"]["merged_loss"] == pytest.approx(merged_loss, abs=1e-6)
    assert report["eval"]["change"] == pytest.approx(merged_loss - adapter_loss, abs=1e-6)
    if quantization == "8bit":  # int8 matmuls also quantize the activations: close, not exact
        assert abs(report["eval"]["change"]) < 0.05
        return
    # 4-bit matmuls dequantize the weights, so the merged model is the adapter up to float
    # error; merging into the original float weights would add back the quantization error
    # the adapter was trained on top of.
    reference = probe(on_quantized)
    ours, theirs = (probe(result) - reference).abs().max(), (probe(naive) - reference).abs().max()
    assert ours < 1e-3 and ours * 100 < theirs, (ours, theirs)
    assert abs(report["eval"]["change"]) < 1e-4 < abs(naive_loss - adapter_loss)


# --------------------------------------------------------------------------- several adapters


@pytest.fixture(scope="module")
def second_lora(data, tmp_path_factory):
    root = tmp_path_factory.mktemp("second")
    return train_run(root, data, "lora-b", training={"seed": 7, "lr": 1e-2}, method="lora").run_dir


def lora_factors(run_dir: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """module weight name -> (A, B, scaling) from a saved LoRA adapter."""
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    tensors = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    out = {}
    for key, a in tensors.items():
        if ".lora_A." in key:
            module = key.split(".lora_A.")[0].removeprefix("base_model.model.")
            b = tensors[key.replace("lora_A", "lora_B")]
            out[f"{module}.weight"] = (a, b, config["lora_alpha"] / config["r"])
    return out


@pytest.mark.parametrize("combination", ["cat", "linear"])
def test_two_lora_runs_combine_with_weights(runs, second_lora, tmp_path, combination):
    from peft import PeftModel

    from peftcli.model.load import load_model
    from peftcli.recipe import ModelSection

    first = runs["lora"]["run"]
    out = tmp_path / combination
    code, _, _ = cli(
        "merge",
        str(first),
        str(second_lora),
        "-o",
        str(out),
        "--weights",
        "0.7,0.3",
        "--combination",
        combination,
    )
    assert code == 0
    weights = load_file(out / "model.safetensors")
    base = load_file(builtin.materialise("tiny-llama") / "model.safetensors")
    (a1, b1, s1), (a2, b2, s2) = (
        lora_factors(r)["model.layers.0.self_attn.q_proj.weight"] for r in (first, second_lora)
    )
    key = "model.layers.0.self_attn.q_proj.weight"
    delta = weights[key] - base[key]
    if combination == "cat":  # exactly the weighted sum of the two updates
        expected = 0.7 * s1 * b1 @ a1 + 0.3 * s2 * b2 @ a2
    else:  # PEFT's linear: A and B averaged separately, √(w·s) on each side (cross terms)
        c1, c2 = (0.7 * s1) ** 0.5, (0.3 * s2) ** 0.5
        expected = (c1 * b1 + c2 * b2) @ (c1 * a1 + c2 * a2)
    # delta is a difference of float32 weights (|w| < 0.4, 1 ulp = 3e-8; 1.5e-8 measured): 1e-6
    # is 30 ulp, while cat and linear differ by cross terms of delta's own order (~1e-2).
    assert torch.allclose(delta, expected, atol=1e-6), (delta - expected).abs().max()
    # ... and the whole folder is what PEFT itself makes of the two adapters.
    peft_model = PeftModel.from_pretrained(
        load_model(ModelSection(name_or_path="builtin:tiny-llama", dtype="float32")),
        str(first / "adapter"),
        "a",
    )
    peft_model.load_adapter(str(second_lora / "adapter"), "b")
    peft_model.add_weighted_adapter(["a", "b"], [0.7, 0.3], "ab", combination_type=combination)
    reference = peft_model.merge_and_unload(adapter_names=["ab"]).state_dict()
    # PEFT's own float32 merge of the same factors: equal up to 1 ulp of |w| <= 1 (1.2e-7; 0
    # measured); 1e-6 is margin.
    for name, tensor in weights.items():
        assert torch.allclose(tensor, reference[name], atol=1e-6), name
    report = json.loads((out / "merge_report.json").read_text())
    assert report["combination"] == combination and report["weights"] == [0.7, 0.3]


# --------------------------------------------------------------------------- refusals


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def unmergeable(data, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("unmergeable")
    return {m: train_run(root, data, m, steps=1, method=m).run_dir for m in NOT_MERGEABLE}


@pytest.mark.parametrize("method", NOT_MERGEABLE)
def test_methods_that_cannot_merge_are_refused(unmergeable, method, tmp_path, capsys):
    out = tmp_path / "out"
    for target in (unmergeable[method], unmergeable[method] / "adapter"):
        code, stdout, err = cli("merge", str(target), "-o", str(out), capsys=capsys)
        line = one_error_line(err)
        assert code == 2 and not stdout and f"{method} adapters cannot be merged" in line
        assert "PeftModel.from_pretrained(base" in line and "peftcli generate" in line
        assert not out.exists()
    # ... and serving it the way the message says works.
    code, stdout, _ = cli(
        "generate",
        str(unmergeable[method]),
        "-p",
        "Uppercase: ab\n",
        "--max-new-tokens",
        "3",
        "--json",
        capsys=capsys,
    )
    assert code == 0 and set(json.loads(stdout)) == {"prompt", "output", "template", "empty"}


def test_refusal_in_a_real_process_has_no_traceback(unmergeable, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "peftcli.cli",
            "merge",
            str(unmergeable["prompt-tuning"]),
            "-o",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "prompt-tuning adapters cannot be merged" in one_error_line(proc.stderr)


def test_existing_out_is_kept_unless_overwrite(runs, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    # A folder peftcli did not make is never replaced, --overwrite or not.
    for flags in ([], ["--overwrite"]):
        code, _, err = cli("merge", str(runs["lora"]["run"]), "-o", str(out), *flags, capsys=capsys)
        assert code == 2 and "is not a folder peftcli made" in one_error_line(err)
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    out = tmp_path / "merged"
    assert cli("merge", str(runs["lora"]["run"]), "-o", str(out), capsys=capsys)[0] == 0
    code, _, err = cli("merge", str(runs["lora"]["run"]), "-o", str(out), capsys=capsys)
    assert (
        code == 2 and "already holds a peftcli merge output" in one_error_line(err) and "--overwrite" in err
    )
    code, _, _ = cli("merge", str(runs["lora"]["run"]), "-o", str(out), "--overwrite", capsys=capsys)
    assert code == 0 and (out / "model.safetensors").is_file()
    # The run it reads from is never a valid output.
    code, _, err = cli(
        "merge", str(runs["lora"]["run"]), "-o", str(runs["lora"]["run"]), "--overwrite", capsys=capsys
    )
    assert code == 2 and "which the merge reads" in one_error_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "out"]  # nothing left beside OUT


def test_a_failed_write_leaves_no_partial_out(runs, tmp_path, capsys):
    """A real I/O failure mid-write (file size limit, as a full disk would): no OUT appears, an
    existing OUT stays as it was, and no temporary folder is left beside it."""
    run = str(runs["lora"]["run"])
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    def merge_with_limit(*args: str) -> tuple[int, str]:
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, old_limit[1]))  # model.safetensors is 3 MB
        try:
            code, _, err = cli("merge", run, *args, capsys=capsys)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        return code, err

    try:
        code, err = merge_with_limit("-o", str(tmp_path / "new"))
        assert code == 2 and "cannot write" in one_error_line(err)
        assert list(tmp_path.iterdir()) == []
        assert cli("merge", run, "-o", str(tmp_path / "old"), capsys=capsys)[0] == 0
        before = {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()}
        code, err = merge_with_limit("-o", str(tmp_path / "old"), "--overwrite", "--dtype", "bfloat16")
        assert code == 2 and "cannot write" in one_error_line(err)
        assert {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()} == before
        assert [p.name for p in tmp_path.iterdir()] == ["old"]
    finally:
        signal.signal(signal.SIGXFSZ, old_handler)


def test_mismatched_adapters_are_refused(runs, data, second_lora, tmp_path, capsys):
    gpt2 = train_run(tmp_path, data, "gpt2", model="tiny-gpt2", steps=1, method="lora").run_dir
    capsys.readouterr()
    out = str(tmp_path / "out")
    cases = [
        ([runs["lora"]["run"], gpt2], [], "cannot combine", "tiny-gpt2"),
        ([runs["lora"]["run"], runs["qlora"]["run"]], [], "(lora) with", "qlora"),
        (
            [runs["dora"]["run"], runs["lora"]["run"]],
            [],
            "dora adapters cannot be combined",
            "lora and qlora",
        ),
        ([runs["lora"]["run"], second_lora], ["--weights", "1,2,3"], "--weights has 3 values for 2", ""),
        ([runs["lora"]["run"], second_lora], ["--weights", "a,b"], "not a comma-separated list", ""),
        ([runs["lora"]["run"], second_lora], ["--combination", "ties"], "needs --density", ""),
        ([runs["lora"]["run"], second_lora], ["--combination", "linera"], "did you mean `linear`", ""),
        ([runs["lora"]["run"]], ["--dtype", "float8"], "--dtype: `float8` is not one of", ""),
        ([tmp_path / "nowhere"], [], "no such run, adapter or model folder", ""),
        ([builtin.materialise("tiny-llama")], [], "nothing to merge", ""),
    ]
    for paths, extra, expected, also in cases:
        code, _, err = cli("merge", *map(str, paths), "-o", out, *extra, capsys=capsys)
        line = one_error_line(err)
        assert code == 2 and expected in line and also in line, (expected, line)
    assert not Path(out).exists()


def test_an_adapter_folder_outside_its_run_merges_with_a_note(runs, tmp_path, capsys):
    import shutil

    adapter = shutil.copytree(runs["lora"]["run"] / "adapter", tmp_path / "adapter")
    code, _, err = cli("merge", str(adapter), "-o", str(tmp_path / "out"), capsys=capsys)
    assert code == 0 and "is not inside a run, so the base is taken as stored" in err
    model = auto_class("causal_lm").from_pretrained(tmp_path / "out")
    assert torch.allclose(probe(model), runs["lora"]["logits"], atol=MERGE_ATOL)  # see MERGE_ATOL


@pytest.mark.parametrize(
    "name, note",
    [
        ("lora", None),
        ("dora", "vLLM does not serve DoRA adapters"),
        ("ia3", "a IA3 adapter"),
        ("qlora", "4/8-bit base"),
    ],
)
def test_merge_says_when_vllm_needs_the_merged_model(runs, name, note, tmp_path, capsys):
    """vLLM's LoRA support serves a plain LoRA adapter on its base (measured: make test-interop);
    for the others `merge` says in one line that the merged model is what to serve."""
    code, _, err = cli("merge", str(runs[name]["run"]), "-o", str(tmp_path / "m"), capsys=capsys)
    assert code == 0, err
    said = [line for line in err.splitlines() if "vLLM" in line]
    if note is None:
        assert said == []
    else:
        assert len(said) == 1 and note in said[0] and "serve the merged model" in said[0], said
