"""4/8-bit bases on every CPU. bitsandbytes' packed CPU path (CPUs with AVX-512 BF16) fails on
some shapes, drops gradients after an evaluation and rounds to bf16 (see peftcli/quant.py), so
peftcli keeps every 4-bit layer on the portable path: an evaluation computes exactly what the
training forward computes, on any CPU."""

from __future__ import annotations

import json

import pytest
import torch

from peftcli.model.load import load_model
from peftcli.recipe import ModelSection

from .conftest import run_cli, write_recipe

bnb = pytest.importorskip("bitsandbytes")


def tiny_llama_4bit() -> torch.nn.Module:
    return load_model(ModelSection(name_or_path="builtin:tiny-llama", quantization="4bit", dtype="float32"))


def test_every_4bit_layer_takes_the_portable_path():
    layers = [m for m in tiny_llama_4bit().modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 28  # 7 projections × 4 layers
    assert not any(getattr(m, "support_avx512bf16_for_cpu", False) for m in layers)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_the_no_grad_forward_equals_the_grad_forward(dora):
    """Evaluation and generation (eval mode, no grad) run the same kernels on the same
    dequantized weights as a training forward (dropout 0): the logits are bitwise equal, and a
    training forward after an evaluation is unchanged (no weight was repacked)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(r=4, target_modules="all-linear", use_dora=dora, init_lora_weights=False)
    model = get_peft_model(tiny_llama_4bit(), config)
    ids = torch.randint(0, 250, (2, 24), device=next(model.parameters()).device)
    model.train()
    reference = model(input_ids=ids).logits.detach()
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference)
    model.train()
    assert torch.equal(model(input_ids=ids).logits.detach(), reference)


def train_rows(run) -> list[tuple]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["lr"], r["tokens"]) for r in rows if "loss" in r]


def test_qlora_trains_evaluates_and_saves_and_evaluations_do_not_change_training(tmp_path, completion_data):
    """The issue's command, on the installed script: train, evaluate with a no-grad forward and
    greedy generation, save. Evaluating after every step must leave training exactly as it is
    without evaluations (each one packs the weights on an AVX-512 BF16 CPU; before the fix the
    steps after it lost the gradient through the base layers)."""
    from safetensors.torch import load_file

    runs = {}
    for name, every in [("plain", []), ("evals", ["training.eval_every=1"])]:
        run = tmp_path / name
        recipe = write_recipe(
            tmp_path / f"{name}.yaml",
            peft={"method": "qlora"},
            training={"output_dir": str(run)},
            eval={"metrics": ["loss", "exact_match"], "max_new_tokens": 4},
        )
        proc = run_cli("train", str(recipe), "training.max_steps=3", *every)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr
        assert (run / "adapter" / "adapter_model.safetensors").is_file()
        evals = json.loads((run / "eval.json").read_text())
        assert evals["loss"] > 0 and 0 <= evals["exact_match"] <= 1
        runs[name] = run

    assert [r[0] for r in train_rows(runs["plain"])] == [1, 2, 3]
    assert train_rows(runs["evals"]) == train_rows(runs["plain"])
    plain, evals = (load_file(runs[n] / "adapter" / "adapter_model.safetensors") for n in ("plain", "evals"))
    assert plain.keys() == evals.keys() and all(torch.equal(plain[k], evals[k]) for k in plain)


def test_lora_on_an_8bit_base_trains_evaluates_and_saves(tmp_path, completion_data):
    """8-bit layers have no packed CPU path (int8 matmuls take any shape): the same run works."""
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", model={"quantization": "8bit"}, eval={"metrics": ["loss"]})
    proc = run_cli("train", str(recipe), "training.max_steps=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((run / "eval.json").read_text())["loss"] > 0


# 8-bit under test-all: the head is kept out by the same skip list as 4-bit's, and an 8-bit base
# trains by default in test_lora_on_an_8bit_base_trains_evaluates_and_saves.
@pytest.mark.parametrize("quantization", ["4bit", pytest.param("8bit", marks=pytest.mark.slow)])
def test_a_classifier_on_a_quantized_base_trains_its_full_precision_head(tmp_path, quantization):
    """The classification head is new and trained whole: it stays out of quantization."""
    run = tmp_path / "run"
    proc = run_cli(
        "train",
        "recipes/bert-lora-cls.yaml",
        f"model.quantization={quantization}",
        "training.max_steps=2",
        f"training.output_dir={run}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((run / "eval.json").read_text())["accuracy"] >= 0


def test_loading_bitsandbytes_fetches_no_kernel_from_the_hub():
    """transformers 5.25 brings the `kernels` package, and bitsandbytes 0.50 then fetches a CPU
    kernel from the Hub when imported on an AVX512-BF16 CPU; peftcli refuses that fetch (its
    4-bit layers stay off that path) and nothing is said about it."""
    import subprocess
    import sys

    pytest.importorskip("kernels")
    code = (
        "import kernels\n"
        "asked = []\n"
        "fetch = kernels.get_kernel\n"
        "kernels.get_kernel = lambda repo, *a, **k: asked.append(repo) or fetch(repo, *a, **k)\n"
        "from peftcli.console import quiet_libraries\n"
        "quiet_libraries()\n"
        "import bitsandbytes, peft\n"
        "print(asked)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    assert "kernels-community" not in proc.stderr and "publisher trust" not in proc.stderr


def test_a_bf16_4bit_model_keeps_embeddings_head_and_norms_in_bf16():
    """No fp32 copies beside the 4-bit weights (PEFT's prepare_model_for_kbit_training made
    them): every unquantized parameter stays in the compute dtype, all of them frozen."""
    model = load_model(ModelSection(name_or_path="builtin:tiny-llama", quantization="4bit", dtype="bfloat16"))
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert model.get_output_embeddings().weight.dtype == torch.bfloat16
    unquantized = {n: p for n, p in model.named_parameters() if not isinstance(p, bnb.nn.Params4bit)}
    assert len([n for n in unquantized if "norm" in n]) == 2 * 4 + 1  # 2 a layer, the final one
    assert {p.dtype for p in unquantized.values()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in model.parameters())


def test_qlora_loss_without_the_fp32_upcast_equals_the_upcast_loss():
    """The loss and gradients under bf16 autocast, as a GPU trains QLoRA, with the embeddings,
    head and norms kept in bf16 (peftcli) or upcast to fp32 (PEFT's k-bit preparation)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from peftcli.model.quant import portable_kernels
    from peftcli.training.losses import loss_sum

    section = ModelSection(name_or_path="builtin:tiny-llama", quantization="4bit", dtype="bfloat16")
    upcast = load_model(section)
    upcast = prepare_model_for_kbit_training(upcast, use_gradient_checkpointing=False)
    portable_kernels(upcast)
    assert upcast.get_input_embeddings().weight.dtype == torch.float32  # what peftcli no longer does
    results = []
    for base in (load_model(section), upcast):
        torch.manual_seed(0)
        config = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False, lora_dropout=0.0)
        model = get_peft_model(base, config).train()
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, model.config.vocab_size, (2, 24), generator=g)
        labels = ids.clone()
        labels[:, :8] = -100
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_sum(model, batch, "causal_lm")
            logits = model(input_ids=ids).logits
        loss.backward()
        count = int((labels[:, 1:] != -100).sum())
        grads = [p.grad.float() for p in model.parameters() if p.requires_grad]
        results.append(
            (loss.item() / count, logits.abs().max().item(), torch.cat([g.flatten() for g in grads]))
        )
    (kept, top, g_kept), (upcast_loss, _, g_upcast) = results
    # Both run every matmul in bf16 (autocast, and the 4-bit layers' compute dtype); they differ
    # only in where the residual stream and the norms' outputs are rounded to bf16: 2 roundings per
    # layer (4 layers) plus the final norm's 2, each at most u = 2**-8 relative (bf16 keeps 8
    # significant bits), so the head's input moves by at most 10u relative, the logits by 10u of
    # the largest logit, and a token's cross-entropy by twice that.
    assert abs(kept - upcast_loss) <= 2 * 10 * 2**-8 * top
    assert torch.isfinite(g_kept).all() and g_kept.norm() > 0
    # An adapter's gradient is its input (moved by 10u) times the gradient flowing back, moved by
    # 10u through the forward and by 10u more where backward rounds the residual stream: 30u.
    # (Measured: 1e-4 relative on the loss, 3.9% on the gradients, where 30u is 11.7%.)
    assert (g_kept - g_upcast).norm() <= 3 * 10 * 2**-8 * g_upcast.norm()
