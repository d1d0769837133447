"""`peftcli estimate`: parameter counts equal those of the real model with the method applied
(methods × tiny architectures, quantized bases included), byte counts equal the real tensors,
and the memory plan matches the peak memory a real training step adds, measured on CPU."""

from __future__ import annotations

import itertools
import json
import math
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from peftcli import data as data_stage
from peftcli.commands.estimate import estimate, parse_memory, quantized_bytes
from peftcli.methods.apply import apply_method
from peftcli.model.load import load_model
from peftcli.recipe_file import load_recipe
from peftcli.training.accelerator import trainable_summary

from .conftest import ROOT, cli, run_cli, write_jsonl, write_recipe

sys.path.insert(0, str(ROOT / "bench"))
from bench_memory_plan import SIZES  # noqa: E402

TASKS = {"tiny-llama": "causal_lm", "tiny-gpt2": "causal_lm", "tiny-t5": "seq2seq_lm", "tiny-bert": "seq_cls"}


@pytest.fixture
def data_dir(tmp_path, completion_data):
    write_jsonl(
        tmp_path / "cls.jsonl", [{"text": f"w{i}", "label": ["neg", "pos", "mid"][i % 3]} for i in range(30)]
    )
    return tmp_path


def tensor_bytes(model) -> int:
    """Bytes of every distinct storage a model holds: parameters, buffers, and the
    bitsandbytes quantization state (absmax, code tables, 8-bit row scales)."""
    seen: dict[int, int] = {}

    def add(t):
        if torch.is_tensor(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

    for t in itertools.chain(model.parameters(), model.buffers()):
        add(t)
        if (qs := getattr(t, "quant_state", None)) is not None:
            for x in (qs.absmax, qs.code, qs.offset, qs.state2.absmax, qs.state2.code):
                add(x)
        add(getattr(t, "SCB", None))
    return sum(seen.values())


CASES = [(method, model, "none") for method in ("lora", "ia3", "prompt-tuning", "adapter") for model in TASKS]
CASES += [("lora", "tiny-llama", "4bit"), ("lora", "tiny-llama", "8bit"), ("ia3", "tiny-gpt2", "4bit")]
CASES += [("dora", "tiny-t5", "4bit")]


@pytest.mark.parametrize(("method", "model", "quantization"), CASES)
def test_counts_and_bytes_equal_the_real_model(data_dir, method, model, quantization):
    task = TASKS[model]
    path = write_recipe(
        data_dir / "r.yaml",
        model={"name_or_path": f"builtin:{model}", "task": task, "quantization": quantization},
        peft={"method": method},
        data={"train": "cls.jsonl" if task == "seq_cls" else "train.jsonl"},
    )
    recipe = load_recipe(path)
    est = estimate(recipe)

    labels = data_stage.label_names(data_stage.read_rows(recipe.data.train)) if task == "seq_cls" else None
    real = apply_method(load_model(recipe.model, labels=labels), recipe.peft, task, total_steps=10)
    counts = trainable_summary(real)
    head = sum(p.numel() for n, p in real.named_parameters() if p.requires_grad and "modules_to_save." in n)
    assert est["total_params"] == counts["total_params"]
    assert est["trainable_params"] == counts["trainable_params"]
    assert est["adapter_params"] == counts["trainable_params"] - head
    assert est["head_params"] == head and (head > 0) == (task == "seq_cls")
    assert est["trainable_share"] == pytest.approx(counts["trainable_params"] / counts["total_params"])
    mem = est["memory"]
    assert mem["weights_bytes"] + mem["adapter_bytes"] == tensor_bytes(real)  # exact, quantized too
    trainable_bytes = sum(p.numel() * p.element_size() for p in real.parameters() if p.requires_grad)
    assert mem["adapter_bytes"] == trainable_bytes
    assert mem["optimizer_bytes"] == 2 * trainable_bytes == 2 * mem["gradients_bytes"]


def test_nf4_double_quantization_costs_4_127_bits_per_weight():
    n = 4096 * 14336  # a Llama-3.1-8B MLP projection
    # The per-tensor tables (NF4, second level, offset: 1,092 bytes) add 1.5e-7 bits per weight.
    assert 8 * quantized_bytes(n, 4096, "4bit") / n == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-3)
    assert quantized_bytes(n, 4096, "8bit") == n + 4 * 4096


def test_json_shape_and_fits(tmp_path, completion_data, capsys):
    path = write_recipe(tmp_path / "r.yaml")
    code, out, _ = cli("estimate", str(path), "--json", "--gpu-memory", "24GB", capsys=capsys)
    result = json.loads(out)
    assert code == 0
    assert {"total_params", "adapter_params", "trainable_params", "trainable_share", "memory", "fits"} <= set(
        result
    )
    memory = result["memory"]
    parts = ["weights_bytes", "adapter_bytes", "optimizer_bytes", "gradients_bytes", "activations_bytes"]
    assert set(memory) == {*parts, "total_bytes"}
    assert memory["total_bytes"] == sum(memory[k] for k in parts)
    assert result["fits"] is True and result["margin_bytes"] > 20 * 2**30
    assert result["plan"]["dtype"] == "bfloat16"  # planned for a GPU: auto means bf16
    # Too small a GPU: does not fit, and says by how much.
    code, out, _ = cli("estimate", str(path), "--json", "--gpu-memory", "1GB", capsys=capsys)
    small = json.loads(out)
    assert small["fits"] is False and small["margin_bytes"] < 0
    code, out, _ = cli("estimate", str(path), capsys=capsys)
    assert code == 0 and "trainable" in out and "activations" in out and "fits" not in out
    code, out, _ = cli("estimate", str(path), "--gpu-memory", "1GB", capsys=capsys)
    assert "does not fit in 1.0 GiB" in out and "short" in out


def test_activations_follow_checkpointing_batch_and_processes(tmp_path, completion_data):
    path = write_recipe(tmp_path / "r.yaml")
    plain = estimate(load_recipe(path))
    ckpt = estimate(load_recipe(path, ["training.gradient_checkpointing=true"]))
    double = estimate(load_recipe(path, ["training.batch_size=16"]))
    ddp = estimate(load_recipe(path), num_processes=4)
    act = plain["memory"]["activations_bytes"]
    assert ckpt["memory"]["activations_bytes"] < act
    assert double["memory"]["activations_bytes"] == 2 * act  # linear in tokens
    assert ddp["memory"]["gradients_bytes"] == 2 * plain["memory"]["gradients_bytes"]  # DDP buckets
    assert ddp["plan"]["all_processes_bytes"] == 4 * ddp["memory"]["total_bytes"]


def test_an_8b_config_without_weights_answers_from_the_config(tmp_path, completion_data):
    """Only config.json in the folder: nothing to load, and the counts agree with `peftcli methods`."""
    from peftcli.methods.reference import REFERENCE, load

    folder = tmp_path / "llama-8b"
    folder.mkdir()
    config = {k: v for k, v in REFERENCE.items() if k != "name"}
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", **config}))
    path = write_recipe(tmp_path / "r.yaml", model={"name_or_path": str(folder)}, peft={"method": "qlora"})
    result = estimate(load_recipe(path, ["peft.r=8", "peft.alpha=16"]), gpu_memory="24GB")
    reference = load()
    assert result["trainable_params"] == reference["methods"]["qlora"]["trainable_params"]
    assert result["total_params"] == reference["total_params"] + result["trainable_params"]
    # 6.98 B quantized weights at ~4.127 bits, 1.05 B embedding/head weights in bf16 (not upcast).
    embed = 2 * 128256 * 4096
    linear = 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336)
    expected = linear * 4.127 / 8 + embed * 2
    # `expected` rounds 4.12695 bits to 4.127 (1e-5) and leaves out the bf16 norm weights and the
    # rotary buffers (0.5 MB of 5.7 GB: 1e-4).
    assert result["memory"]["weights_bytes"] == pytest.approx(expected, rel=0.001)
    assert result["fits"] is True


def test_llama_7b_nf4_weights_fall_in_the_qlora_papers_band(tmp_path, completion_data):
    """The QLoRA paper (Dettmers et al. 2023) puts LLaMA-7B's NF4 weights at about 3.9 GB: the
    embeddings and head stay in bf16 beside the 4-bit linears (PEFT's fp32 upcast made 4.39 GB)."""
    folder = tmp_path / "llama-7b"
    folder.mkdir()
    shape = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32}
    shape |= {"num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000}
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", **shape}))
    path = write_recipe(tmp_path / "r.yaml", model={"name_or_path": str(folder)}, peft={"method": "qlora"})
    result = estimate(load_recipe(path), gpu_memory="24GB")
    assert result["plan"]["dtype"] == "bfloat16"
    assert 3.3e9 <= result["memory"]["weights_bytes"] <= 4.3e9
    # 6.48 B linear weights at 4.127 bits + 262 M embedding and head weights at 2 bytes.
    expected = 32 * (4 * 4096**2 + 3 * 4096 * 11008) * 4.127 / 8 + 2 * 32000 * 4096 * 2
    # Rounding 4.12695 bits to 4.127 (1e-5); the norms and rotary buffers left out (0.5 MB: 1.4e-4).
    assert result["memory"]["weights_bytes"] == pytest.approx(expected, rel=0.001)


def test_fsdp_plan_shards_the_base_and_says_when_sharding_is_what_makes_it_fit(
    tmp_path, completion_data, capsys
):
    """An 8B LoRA in bf16 on 8 GPUs of 16 GB: DDP keeps the 16 GB base on every GPU and does not
    fit; FSDP2 keeps 1/8 of it (and of the adapter and its optimizer state) and does."""
    from peftcli.methods.reference import REFERENCE

    folder = tmp_path / "llama-8b"
    folder.mkdir()
    config = {k: v for k, v in REFERENCE.items() if k != "name"}
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", **config}))
    path = write_recipe(
        tmp_path / "r.yaml",
        model={"name_or_path": str(folder), "dtype": "bfloat16"},
        training={"mixed_precision": "bf16"},
    )
    result = estimate(load_recipe(path), gpu_memory="16GB", num_processes=8)
    whole, sharded = result["memory"], result["fsdp"]
    # Buffers (rotary inv_freq) are kept whole on every process, not sharded: < 1e-6 of the weights.
    assert sharded["weights_bytes"] == pytest.approx(whole["weights_bytes"] / 8, rel=1e-3)
    assert sharded["optimizer_bytes"] == math.ceil(whole["optimizer_bytes"] / 8)
    # Two units gathered whole at a time: here the embedding and the head, 128256 × 4096 in bf16 each.
    assert sharded["gathered_bytes"] == 2 * 128256 * 4096 * 2
    assert result["fits"] is False and sharded["fits"] is True
    code, out, _ = cli("estimate", str(path), "--num-processes", "8", "--gpu-memory", "16GB", capsys=capsys)
    assert code == 0 and "sharded with FSDP over 8 processes" in out
    assert "sharding is what makes it fit: launch with --launch-config configs/fsdp.yaml" in out


def test_user_mistakes_exit_2(tmp_path, completion_data, capsys):
    path = write_recipe(tmp_path / "r.yaml")
    code, _, err = cli("estimate", str(path), "--gpu-memory", "lots", capsys=capsys)
    assert code == 2 and "--gpu-memory: cannot read `lots`" in err
    hub = write_recipe(tmp_path / "hub.yaml", model={"name_or_path": "no-such-org/no-such-model"})
    proc = run_cli("estimate", str(hub))  # the installed command, as a user runs it
    assert proc.returncode == 2 and "estimate needs the config of `no-such-org/no-such-model`" in proc.stderr
    # the command huggingface_hub installs (it no longer ships `huggingface-cli`)
    assert "hf download no-such-org/no-such-model config.json" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    gpt2 = write_recipe(
        tmp_path / "g.yaml", model={"name_or_path": "builtin:tiny-gpt2"}, peft={"method": "loha"}
    )
    code, _, err = cli("estimate", str(gpt2), capsys=capsys)
    assert code == 2 and "loha cannot adapt the Conv1D layers" in err
    code, _, err = cli("estimate", str(tmp_path / "missing.yaml"), capsys=capsys)
    assert code == 2 and "recipe file not found" in err


def test_parse_memory():
    assert parse_memory("24GB") == parse_memory("24GiB") == parse_memory("24") == 24 * 2**30
    assert parse_memory("16000MB") == 16000 * 2**20 and parse_memory("0.5 TB") == 2**39


# --------------------------------------------------------------------------- counted memory

# The plan is checked against the tensors a real training step holds, counted exactly: the
# bytes autograd keeps for backward, `.grad` and AdamW's state. Those counts follow from the
# model's ops and shapes alone, so they are the same on every CPU (and GPU); the process's
# resident memory is not (kernels, workspaces and the allocator differ), so peak RSS is a
# benchmark figure: `make bench-memory` (bench/bench_memory_plan.py).


@pytest.fixture(scope="module")
def llama_folders(tmp_path_factory):
    """Random-init Llamas saved as ordinary model folders (tiny-llama's tokenizer) with 16 rows of
    text longer than max_length, built once per size: the models `make bench-memory` measures."""
    import bench_memory_plan

    made: dict[str, Path] = {}

    def make(size: str) -> Path:
        if size not in made:
            made[size] = bench_memory_plan.make_model(size, tmp_path_factory.mktemp(size))
        return made[size]

    return make


@dataclass
class Counted:
    """What one optimizer step of `peftcli.training.loop.fit` held, in bytes."""

    saved: dict[str, int]  # kept for backward when the forward pass ends, by layer ('' = outside)
    gradients: int  # `.grad` of the trainable parameters before the optimizer step
    optimizer: int  # AdamW's moments after the step
    step_counters: int  # AdamW's `step`, a scalar tensor per parameter tensor
    trainable_tensors: int
    model: Any


def count_training_step(recipe: Path, overrides: list[str]) -> Counted:
    """Trains the recipe for its steps through the real `train`, counting as it goes."""
    import peftcli.objectives.sft as sft
    import peftcli.training.loop as loop
    from peftcli.commands.estimate_activations import _LAYER_PREFIX
    from peftcli.training.run import train

    counts: dict[str, Any] = {"saved": defaultdict(int)}
    real_make_optimizer, real_loss_sum = loop.make_optimizer, sft.loss_sum

    def make_optimizer(model, section, lr_ratios=None):
        optimizer = real_make_optimizer(model, section, lr_ratios)
        params = [p for p in model.parameters() if p.requires_grad]
        counts["trainable_tensors"] = len(params)
        counts["model"] = model

        def before_step(*_):
            counts["gradients"] = sum(nbytes(p.grad) for p in params if p.grad is not None)

        def after_step(opt, *_):
            state = [(k, t) for s in opt.state.values() for k, t in s.items()]
            counts["optimizer"] = sum(nbytes(t) for k, t in state if k != "step")
            counts["step_counters"] = sum(nbytes(t) for k, t in state if k == "step")

        optimizer.register_step_pre_hook(before_step)
        optimizer.register_step_post_hook(after_step)
        return optimizer

    def loss_sum(model, batch, task):
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen: set[int] = set()
        where = [""]
        handles = []
        for name, module in model.named_modules():
            if (m := _LAYER_PREFIX.match(name + ".")) and m[1] == name:  # a repeated block
                handles.append(module.register_forward_pre_hook(lambda *_, n=name: where.append(n) or None))
                handles.append(module.register_forward_hook(lambda *_: where.pop() and None))

        def pack(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in params and storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                counts["saved"][where[-1]] += storage.nbytes()
            return t

        counts["saved"].clear()  # the last micro-batch's forward is the one counted
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                return real_loss_sum(model, batch, task)
        finally:
            for h in handles:
                h.remove()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "make_optimizer", make_optimizer)
        patch.setattr(sft, "loss_sum", loss_sum)  # SFT's loss, as the loop calls it
        train(load_recipe(recipe, overrides))
    return Counted(**{**counts, "saved": dict(counts["saved"])})


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def unmodelled_bytes(model: Any, r: int, tokens: int, length: int, kept_layers: int | None = None) -> int:
    """An upper bound on what the activation formula leaves out or counts in excess (its
    docstring: "small terms ... are left out"), from the model's shape:

    - per token, in each block whose activations are kept (all of them; one when gradient
      checkpointing recomputes them in backward): LoRA's rank-r intermediate (A·x, kept for B)
      per adapted layer, up to two statistics per norm (RMSNorm's rsqrt; LayerNorm's mean and
      rstd), and attention's log-sum-exp, one float per head for each of at most two
      attentions (a decoder block's self- and cross-attention);
    - per token, twice a norm's input and output (2h + 1): the formula counts the first
      block's norm, whose input needs no gradient when the embedding is frozen, and leaves
      out the final norm under gradient checkpointing;
    - per position, rotary cos/sin tables (head_dim each), shared by all layers;
    - T5's relative position bias, heads × L × L per attention, shared by the batch.

    Each is a float (4 bytes) at most: everything runs in float32 here."""
    from peftcli.commands.estimate_activations import _LAYER_PREFIX

    config = model.config
    blocks = len({m[1] for n, _ in model.named_modules() if (m := _LAYER_PREFIX.match(n))})
    adapted = sum(1 for n, m in model.named_modules() if hasattr(m, "lora_A") and _LAYER_PREFIX.match(n))
    norms = sum(1 for n, m in model.named_modules() if "Norm" in type(m).__name__ and _LAYER_PREFIX.match(n))
    heads = getattr(config, "num_attention_heads", None) or config.num_heads
    hidden = getattr(config, "hidden_size", None) or config.d_model
    kept = blocks if kept_layers is None else kept_layers
    per_token = kept * ((adapted * r + 2 * norms) // blocks + 2 * heads) + 2 * (2 * hidden + 1)
    per_position = 2 * (hidden // heads)
    bias = 2 * blocks * heads * length * length if getattr(config, "relative_attention_num_buckets", 0) else 0
    return 4 * (per_token * tokens + per_position * length + bias)


@pytest.mark.parametrize("size", ["small", pytest.param("llama-512", marks=pytest.mark.slow)])
def test_memory_plan_matches_the_tensors_training_holds(llama_folders, tmp_path, size):
    """One real step of `train`, without and with gradient checkpointing: gradients and AdamW's
    moments equal the plan to the byte; the bytes kept for backward are within what the formula
    knowingly leaves out (`unmodelled_bytes`), on any CPU."""
    recipe = llama_folders(size)
    plain, checkpointed = (
        [f"training.gradient_checkpointing={flag}", f"training.output_dir={tmp_path / flag}"]
        for flag in ("false", "true")
    )
    plans = {flag: estimate(load_recipe(recipe, o)) for flag, o in (("false", plain), ("true", checkpointed))}
    if size == "llama-512":
        # 58.5 M fp32 parameters; the rotary buffers add less than 1e-4 of that
        weights = plans["false"]["memory"]["weights_bytes"]
        assert weights == pytest.approx(4 * 58_466_816, rel=1e-4)
    counted = {"false": count_training_step(recipe, plain)}
    counted["true"] = count_training_step(recipe, checkpointed)

    section = load_recipe(recipe)
    _, _, _, _, batch, length = SIZES[size]  # (hidden, intermediate, layers, vocab, batch, length)
    tokens = batch * length
    for flag in ("false", "true"):
        plan, c = plans[flag], counted[flag]
        memory = plan["memory"]
        assert c.gradients == memory["gradients_bytes"]  # exact: one float32 gradient per trainable value
        assert c.optimizer == memory["optimizer_bytes"]  # exact: AdamW's two moments
        assert c.step_counters == 4 * c.trainable_tensors  # AdamW's float32 step; the plan leaves them out
        kept = sum(c.saved.values())
        if flag == "true":
            # Checkpointing keeps each layer's input in the forward pass; in backward one layer
            # at a time is recomputed and keeps what it keeps without checkpointing (same ops).
            kept += max(v for k, v in counted["false"].saved.items() if k)
        predicted = plan["activations"]["layers_bytes"] + plan["activations"]["logits_saved_bytes"]
        bound = unmodelled_bytes(c.model, section.peft.r, tokens, length, None if flag == "false" else 1)
        print(f"{size}, checkpointing={flag}: predicted {predicted:,}, kept {kept:,}, bound ±{bound:,}")
        assert abs(predicted - kept) <= bound, (flag, predicted, kept, bound)


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2", "tiny-bert", "tiny-t5"])
def test_activation_formula_matches_what_autograd_saves(tmp_path, model):
    """The bytes a real LoRA forward pass saves for backward (each storage counted once,
    parameters excluded) against the plan: the layers plus the fp32 log-probabilities."""
    from peftcli.data import collate, prepare
    from peftcli.model.load import load_tokenizer
    from peftcli.training.losses import loss_sum

    task = TASKS[model]
    # Every row fills max_length (T5: the encoder's prompt and the decoder's answer alike).
    rows = {
        "causal_lm": [{"prompt": "x" * 50, "completion": "y" * 200}] * 8,
        "seq2seq_lm": [{"prompt": "x" * 200, "completion": "y" * 200}] * 8,
        "seq_cls": [{"text": "x" * 300, "label": str(i % 2)} for i in range(8)],
    }[task]
    write_jsonl(tmp_path / "long.jsonl", rows)
    recipe = load_recipe(
        write_recipe(
            tmp_path / "r.yaml",
            model={"name_or_path": f"builtin:{model}", "task": task},
            peft={"method": "lora", "dropout": 0.0},
            data={"train": "long.jsonl", "eval": 0, "max_length": 128},
        )
    )
    act = estimate(recipe)["activations"]
    tokenizer = load_tokenizer(recipe.model)
    data = prepare(recipe.data, tokenizer, 0, task)
    batch = collate(data.train.examples[:8], tokenizer.pad_token_id)
    assert batch["input_ids"].numel() == act["tokens"]
    peft_model = apply_method(load_model(recipe.model, labels=data.labels), recipe.peft, task, 10)
    peft_model.train()
    params = {p.untyped_storage().data_ptr() for p in peft_model.parameters()}
    saved: dict[int, int] = {}

    def keep(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        loss_sum(peft_model, batch, task)
    # What the head keeps for backward. The plan counts every position; a causal LM's head
    # sees only the positions that predict a supervised token.
    head = act["logits_saved_bytes"]
    if task == "causal_lm":
        head *= int((batch["labels"][:, 1:] != -100).sum()) / batch["labels"].numel()
    predicted = act["layers_bytes"] + head
    kept = sum(saved.values())
    bound = unmodelled_bytes(peft_model, recipe.peft.r, act["tokens"], recipe.data.max_length)
    print(f"{model}: predicted {predicted:,.0f}, kept {kept:,}, bound ±{bound:,}")
    assert abs(predicted - kept) <= bound


@pytest.mark.parametrize(
    "builtin, method", [("tiny-llama", "lora"), ("tiny-gpt2", "lora"), ("tiny-llama", "llama-adapter")]
)
def test_grpo_generation_memory_is_the_cache_generate_holds(tmp_path, builtin, method):
    """GRPO's plan counts the key/value cache of batch × num_generations sequences of prompt +
    max_new_tokens (tiny-llama: 2 key/value heads of 4, GQA; GPT-2: 4 of 4): equal to the bytes
    of the cache a real `generate` call leaves. (Prompt learning samples without a cache: 0.)"""
    from peftcli.commands.estimate import estimate
    from peftcli.methods.apply import apply_method
    from peftcli.model.load import load_model
    from peftcli.recipe_file import load_recipe

    rows = [{"prompt": f"Uppercase: {w}\n"} for w in ("cat", "dog", "owl", "emu")]
    path = write_recipe(
        tmp_path / "g.yaml",
        model={"name_or_path": f"builtin:{builtin}"},
        peft={"method": method},
        data={"train": str(write_jsonl(tmp_path / "p.jsonl", rows)), "eval": 0.0, "max_length": 24},
        training={"objective": "grpo", "batch_size": 2},
        grpo={"num_generations": 3, "max_new_tokens": 5, "beta": 0.04, "rewards": [{"kind": "length"}]},
    )
    recipe = load_recipe(path)
    planned = estimate(recipe)["generation"]
    model = apply_method(load_model(recipe.model), recipe.peft, "causal_lm")
    ids = torch.randint(3, 200, (2 * 3, 24))  # the longest prompt data.max_length allows
    with torch.no_grad():
        cache = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, min_new_tokens=5,
            do_sample=False, pad_token_id=0, return_dict_in_generate=True,
        ).past_key_values  # fmt: skip
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert planned["rows"] == 6 and held == planned["kv_cache"], (held, planned)
    assert planned["peak"] >= planned["kv_cache"] and planned["reference"] > 0
    recipe.peft.method = "prompt-tuning"  # sampled without a cache: logits at every position instead
    uncached = estimate(recipe)["generation"]
    positions = 24 + 16 + 5 - 1  # prompt, virtual tokens, answer but its last token
    vocab = load_model(recipe.model).config.vocab_size
    assert uncached["kv_cache"] == 0 and uncached["sampling"] > 6 * positions * vocab * 4
