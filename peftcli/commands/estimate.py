"""`peftcli estimate`: parameter counts and a memory plan, from the model's config alone.

The model is built on the meta device (shapes and dtypes, no storage, no weights read) and
wrapped with the recipe's method by the same `apply_method` as training, so the parameter
counts are exactly those of a real run. Memory is then planned per process, in bytes:

- **weights**: frozen parameters and buffers in their dtype. Quantized bases follow
  bitsandbytes. NF4 with double quantization stores per weight 4 bits + one 8-bit absmax
  per block of 64 weights (8/64 bits) + one fp32 second-level absmax per 256 blocks
  (32/16384 bits) = 4.127 bits, plus per tensor a 16-entry NF4 table, a 256-entry
  second-level table and an offset (fp32). 8-bit (LLM.int8) stores 1 byte per weight plus
  one fp32 scale per output row. Only `nn.Linear`/`Conv1D` layers are quantized; embeddings,
  the head and `_keep_in_fp32_modules` are not, and keep their dtype (no fp32 upcast: see
  `peftcli.model.quant.prepare_quantized`).
- **adapter**: the trainable parameters (the adapter, plus a trained head such as the seq_cls
  classifier) in their dtype — PEFT keeps adapter weights in fp32.
- **optimizer**: AdamW's two moment estimates, in the dtype of each trainable parameter
  (torch's AdamW keeps no separate master copy; the fp32 trainable parameters are that copy).
- **gradients**: one per trainable parameter, in its dtype; with several processes DDP's
  gradient buckets hold a second copy.
- **activations**: what the forward pass keeps for backward, at its peak (the start of the
  backward pass), for `T = batch_size × max_length` tokens (the padded worst case). Per token
  and layer, in the activation dtype (2 bytes under bf16/fp16 mixed precision, else the
  weights' dtype), summed over the layer's linear layers as found in the model:

      2·h per attention or MLP block   the residual stream into the block's norm, and the norm's
                                       output (the input the adapted projections keep)
      + Σ out(q, k, v projections)     queries, keys, values after RoPE, kept by attention
      + Σ in(attention outputs)        the attention output, kept for the output projection
      + 2·Σ out(MLP input projections) gate/up (or fc1) outputs and their activations/product
      + k·out(MLP input)               activations written as several ops keep k more values
                                       (gelu_new: 3, gelu_fast: 5, quick_gelu: 1)
      + heads·L per attention block    where the scores are materialised: eager attention, or
                                       SDPA with attention dropout on CPU; ×3 with that dropout
      + 1 byte·h per block             the model's own residual dropout masks (GPT-2, BERT, T5)
      + (b + 1)·Σ in(adapted layers)   only with adapter dropout > 0 (dropped input + mask)

  plus the output head. A causal LM with a plain linear head fuses the head with the
  cross-entropy (`peftcli.training.losses.LinearCrossEntropy`): it keeps the gradient of the head's
  input (h per position, in the activation dtype) and holds one chunk of logits at a time
  (`fused_rows`: 1/8 of the GPU memory the rest of the plan leaves, at most 32 MiB on a CPU).
  Other language-model heads take 12 bytes per position per vocabulary entry: the fp32
  log-probabilities, the incoming gradient and the logits' gradient alive when backward starts. Both count every position; with `train_on: completion` only the positions
  that predict a supervised token reach the head, so there they are upper bounds. With
  gradient checkpointing only each layer's input (h per token) is kept, plus one layer's
  activations while it is recomputed.
  Small terms (norm statistics, LoRA's rank-r intermediates) are left out. The formula
  assumes every projection's input is kept, as LoRA-style methods on every linear layer keep
  it; with fewer adapted modules it is an upper bound (prompt tuning keeps ~25% less).

Checked in tests/test_estimate.py against the tensors a real training step holds, counted
exactly: gradients and AdamW's moments to the byte; the bytes autograd keeps for backward
within the small terms above (a Llama of width 256: 1.2% over, 5% under with checkpointing;
LoRA on tiny-llama, tiny-gpt2, tiny-bert within 2%, tiny-t5 9% under: its relative position
bias is not modelled). Peak RSS (allocator slack, kernel workspaces) is `make bench-memory`'s.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from peftcli.console import parse_memory, quiet_libraries
from peftcli.errors import UserError
from peftcli.objectives import sequences_per_example

if TYPE_CHECKING:
    from peftcli.methods.targets import LinearIndex
    from peftcli.recipe import Recipe

# CUDA context, cuBLAS/cuDNN workspaces and allocator slack that no tensor accounts for: 1 GiB.
GPU_RESERVE_BYTES = 2**30
_LAYER_PREFIX = re.compile(r"^(.*?\.\d+)\.")


# --------------------------------------------------------------------------- the model, on meta


def _local_rows(recipe: Recipe) -> list[Any] | None:
    from peftcli.data import sources

    if sources.is_hub_dataset(recipe.data.train):
        return None
    return sources.read_rows(recipe.data.train)


def _train_examples(recipe: Recipe, rows: list[Any]) -> int:
    """Training examples after the held-out fraction (as `data.prepare` splits them)."""
    held = recipe.data.eval
    if isinstance(held, float | int) and held:
        return len(rows) - max(1, round(held * len(rows)))
    return len(rows)


def load_config(recipe: Recipe, labels: list[str] | None) -> Any:
    """The model config — from a local folder, the Hugging Face cache, or (online) the hub."""
    from huggingface_hub import constants

    from peftcli.checks import model_folder
    from peftcli.model.load import load_config as config_of

    if model_folder(recipe) is None and constants.HF_HUB_OFFLINE:
        name = recipe.model.name_or_path
        raise UserError(
            f"model.name_or_path: estimate needs the config of `{name}`, which is not in the local "
            "Hugging Face cache, and HF_HUB_OFFLINE is set",
            f"fetch the config once (a few KB, no weights): hf download {name} config.json",
        )
    return config_of(recipe.model, labels)


def quantized_weights(model: Any, quantization: str) -> dict[int, tuple[int, int]]:
    """id(weight) → (numel, output rows) for the weights bitsandbytes would quantize: the
    same selection transformers makes (linear layers, minus the head, tied weights and the
    model's fp32 modules)."""
    if quantization == "none":
        return {}
    import torch.nn as nn
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    skip = HfQuantizer.get_modules_to_not_convert(model, None, model._keep_in_fp32_modules)
    out = {}
    for name, module in model.named_modules():
        if (type(module) is nn.Linear or isinstance(module, Conv1D)) and should_convert_module(name, skip):
            rows = module.weight.shape[1] if isinstance(module, Conv1D) else module.weight.shape[0]
            out[id(module.weight)] = (module.weight.numel(), rows)
    return out


def quantized_bytes(numel: int, rows: int, quantization: str) -> int:
    if quantization == "8bit":
        return numel + 4 * rows  # int8 weights + an fp32 scale per output row
    blocks = math.ceil(numel / 64)
    # packed 4-bit weights + uint8 absmax per 64-block + fp32 absmax per 256 blocks, and per
    # tensor the NF4 table, the second-level table and the second level's fp32 offset
    return math.ceil(numel / 2) + blocks + 4 * math.ceil(blocks / 256) + 4 * (16 + 256 + 1)


# --------------------------------------------------------------------------- activations


def _layers(index: LinearIndex) -> dict[str, list[str]]:
    """Linear layers grouped by the repeated block they sit in ('model.layers.3')."""
    groups: dict[str, list[str]] = defaultdict(list)
    for name in index.names:
        if match := _LAYER_PREFIX.match(name):
            groups[match[1]].append(name)
    return groups


# Activations that transformers writes as several PyTorch ops keep several intermediates for
# backward, where a fused op (silu, gelu, relu) keeps only its input: the extra values kept
# per inner unit.
COMPOSITE_ACTIVATIONS = {"gelu_new": 3, "gelu_fast": 5, "quick_gelu": 1, "gelu_python_tanh": 4}


@dataclass
class LayerShape:
    """What the per-layer formula needs beyond the linear layers themselves."""

    hidden: int
    heads: int
    length: int  # positions per sequence
    act_bytes: int
    scores: bool  # attention probabilities materialised: eager attention, or CPU SDPA with dropout
    attention_dropout: bool
    hidden_dropout: bool
    activation_extra: int


def layer_shape(config: Any, length: int, act_bytes: int, on_gpu: bool) -> LayerShape:
    def first(*names: str) -> Any:
        return next((getattr(config, n) for n in names if getattr(config, n, None) is not None), None)

    attention_dropout = bool(
        first("attention_dropout", "attn_pdrop", "attention_probs_dropout_prob", "dropout_rate")
    )
    activation = first("hidden_act", "activation_function", "dense_act_fn")
    return LayerShape(
        hidden=config.hidden_size,
        heads=first("num_attention_heads") or 1,
        length=length,
        act_bytes=act_bytes,
        # GPU SDPA kernels apply dropout without materialising the scores; CPU falls back to math.
        scores=getattr(config, "_attn_implementation", None) == "eager" or (attention_dropout and not on_gpu),
        attention_dropout=attention_dropout,
        hidden_dropout=bool(first("resid_pdrop", "hidden_dropout_prob", "dropout_rate", "hidden_dropout")),
        activation_extra=COMPOSITE_ACTIVATIONS.get(str(activation), 0),
    )


def layer_bytes(index: LinearIndex, names: list[str], shape: LayerShape) -> int:
    """Activation bytes one layer keeps for backward, per token (see the module docstring)."""
    attn_out = [n for n in names if n in index.attention_outputs()]
    qkv = [n for n in names if n in index.attention and n not in attn_out]
    mlp_out = [n for n in names if n in index.mlp_outputs()]
    mlp_in = [n for n in names if n not in index.attention and n not in mlp_out]
    blocks = len(attn_out) + len(mlp_out)
    floats = 2 * shape.hidden * blocks
    floats += sum(index.shapes[n][1] for n in qkv) + sum(index.shapes[n][0] for n in attn_out)
    floats += 2 * sum(index.shapes[n][1] for n in mlp_in)
    floats += shape.activation_extra * max((index.shapes[n][1] for n in mlp_in), default=0)
    scores = shape.heads * shape.length * len(attn_out)  # per token: one row of each head's scores
    if shape.scores:
        floats += scores * (3 if shape.attention_dropout else 1)  # probabilities (+ mask, dropped)
    out = floats * shape.act_bytes
    if shape.hidden_dropout:
        out += shape.hidden * blocks  # a one-byte mask per block output
    return out


def activations(
    recipe: Recipe, config: Any, peft_model: Any, index: LinearIndex, act_bytes: int, on_gpu: bool, free: Any
) -> dict[str, int]:
    """What the forward pass keeps (see the module doc); `free`: the GPU memory left beside the
    weights, adapter and optimizer (None on a CPU), of which the fused head takes a share."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from peftcli.methods import METHODS

    method = METHODS[recipe.peft.method]
    # Preference pairs are scored as 2 sequences each (chosen and rejected, in one batch).
    batch = recipe.training.batch_size * sequences_per_example(recipe.training.objective)
    length = recipe.data.max_length
    if method.kind == "prompt":  # virtual tokens are positions too
        length += int(
            recipe.peft.options.get("num_virtual_tokens", method.defaults.get("num_virtual_tokens", 0))
        )
    tokens = batch * length
    shape = layer_shape(config, length, act_bytes, on_gpu)
    per_layer = {prefix: layer_bytes(index, names, shape) for prefix, names in _layers(index).items()}
    if recipe.peft.dropout > 0 and "dropout" in method.generic:
        for name, module in peft_model.named_modules():
            match = _LAYER_PREFIX.match(name.removeprefix("base_model.model."))
            if isinstance(module, BaseTunerLayer) and match and match[1] in per_layer:
                per_layer[match[1]] += (act_bytes + 1) * getattr(module, "in_features", 0)
    if recipe.training.gradient_checkpointing:
        layers = len(per_layer) * shape.hidden * act_bytes + max(per_layer.values(), default=0)
    else:
        layers = sum(per_layer.values()) + 2 * shape.hidden * act_bytes  # + the final norm
    if free is not None:
        free = max(free - layers * tokens, 0)
    return {
        "layers": layers * tokens,
        "tokens": tokens,
        **head_bytes(recipe, config, peft_model, tokens, act_bytes, free),
    }


def head_bytes(
    recipe: Recipe, config: Any, peft_model: Any, tokens: int, act_bytes: int, free: int | None
) -> dict[str, int]:
    """The output head's share of the activations: `logits` in all, `saved` of it kept for
    backward (the rest is alive only while the loss is computed). The fused head's chunk is sized
    as training sizes it (`fused_rows`): from `free` GPU memory, or on a CPU this machine's RAM."""
    from peftcli.training.losses import fusable, fused_rows

    task = recipe.model.task
    if task == "seq_cls":
        return {"logits": 12 * recipe.training.batch_size * config.num_labels, "saved": 0}
    vocab = config.vocab_size
    head = peft_model.get_output_embeddings()
    if task == "causal_lm" and head is not None and fusable(head) and recipe.training.objective == "sft":
        # Fused head + cross-entropy: the gradient of the head's input is kept; one chunk
        # of logits (in the activation dtype, then float32 in place) lives at a time.
        saved = tokens * config.hidden_size * act_bytes
        rows = fused_rows(vocab, "cuda" if free is not None else "cpu", free)
        chunk = min(tokens, rows) * vocab * (4 + (act_bytes if act_bytes < 4 else 0))
        return {"logits": saved + chunk, "saved": saved}
    return {"logits": 12 * tokens * vocab, "saved": 4 * tokens * vocab}


# --------------------------------------------------------------------------- the estimate


def estimate(recipe: Recipe, gpu_memory: str | None = None, num_processes: int = 1) -> dict[str, Any]:
    """Parameter counts and per-process memory for the recipe, without loading weights."""
    gpu_bytes = parse_memory(gpu_memory) if gpu_memory is not None else None
    if num_processes < 1:
        raise UserError(f"--num-processes: {num_processes} must be at least 1")
    import torch

    from peftcli.checks import check_model
    from peftcli.data import label_names
    from peftcli.methods.load import wrap_like
    from peftcli.methods.targets import LinearIndex
    from peftcli.model.load import meta_model
    from peftcli.training.loop import plan

    quiet_libraries()
    rows = _local_rows(recipe)
    labels = label_names(rows) if rows is not None and recipe.model.task == "seq_cls" else None
    config = load_config(recipe, labels)
    notes = [n for n in check_model(recipe, config.to_dict())[1:]]
    steps = plan(_train_examples(recipe, rows), recipe.training, num_processes).total_steps if rows else 1000

    # The plan's device: a GPU when one is named (assumed bf16-capable) or present.
    on_gpu = gpu_bytes is not None or torch.cuda.is_available()
    plan = run_plan(recipe, on_gpu, num_processes)
    dtype = getattr(torch, plan["dtype"])
    act_bytes = 2 if plan["mixed_precision"] in ("bf16", "fp16") else dtype.itemsize
    base = meta_model(recipe.model, config, dtype)
    index = LinearIndex.from_model(base)
    quantization = recipe.model.quantization
    quantized = quantized_weights(base, quantization)
    peft_model = wrap_like(base, recipe.peft, recipe.model.task, total_steps=steps)
    params, memory = count_parameters(peft_model, quantized, quantization)

    free = None
    if on_gpu:  # what the fused head's chunk takes a share of
        device = gpu_bytes if gpu_bytes is not None else torch.cuda.mem_get_info()[1]
        free = max(device - GPU_RESERVE_BYTES - memory["weights_bytes"] - 4 * memory["adapter_bytes"], 0)
    act = activations(recipe, base.config, peft_model, index, act_bytes, on_gpu, free)
    memory.update(
        optimizer_bytes=2 * memory["adapter_bytes"],
        gradients_bytes=memory["adapter_bytes"] * (2 if num_processes > 1 else 1),
        activations_bytes=act["layers"] + act["logits"],
    )
    memory["total_bytes"] = sum(memory.values())
    result: dict[str, Any] = {
        **params,
        "memory": memory,
        "activations": {
            "layers_bytes": act["layers"],
            "logits_bytes": act["logits"],
            "logits_saved_bytes": act["saved"],
            "tokens": act["tokens"],
        },
        "fits": None,
        "plan": {**plan, "all_processes_bytes": memory["total_bytes"] * num_processes},
        "notes": notes,
    }
    if num_processes > 1:
        from peftcli.training.sharded import fsdp_memory, fsdp_units

        stored = partial(stored_bytes, quantized=quantized, quantization=quantization)
        result["fsdp"] = fsdp_memory(*fsdp_units(peft_model, stored), memory, num_processes)
    if gpu_bytes is not None:
        needed = memory["total_bytes"] + GPU_RESERVE_BYTES
        result.update(
            fits=needed <= gpu_bytes,
            gpu_memory_bytes=gpu_bytes,
            reserve_bytes=GPU_RESERVE_BYTES,
            margin_bytes=gpu_bytes - needed,
        )
        if "fsdp" in result:
            result["fsdp"]["fits"] = result["fsdp"]["total_bytes"] + GPU_RESERVE_BYTES <= gpu_bytes
    return result


def run_plan(recipe: Recipe, on_gpu: bool, num_processes: int) -> dict[str, Any]:
    """How the estimated run trains: device, dtype, mixed precision, batch shape, processes."""
    dtype = recipe.model.dtype if recipe.model.dtype != "auto" else ("bfloat16" if on_gpu else "float32")
    precision = recipe.training.mixed_precision
    if precision == "auto":
        precision = "bf16" if on_gpu else "no"
    return {
        "method": recipe.peft.method,
        "model": recipe.model.name_or_path,
        "task": recipe.model.task,
        "device": "gpu" if on_gpu else "cpu",
        "dtype": dtype,
        "mixed_precision": precision,
        "quantization": recipe.model.quantization,
        "batch_size": recipe.training.batch_size,
        "objective": recipe.training.objective,
        "sequences": recipe.training.batch_size * sequences_per_example(recipe.training.objective),
        "max_length": recipe.data.max_length,
        "gradient_checkpointing": recipe.training.gradient_checkpointing,
        "num_processes": num_processes,
    }


def count_parameters(
    peft_model: Any, quantized: dict[int, tuple[int, int]], quantization: str
) -> tuple[dict[str, Any], dict[str, int]]:
    """The parameter counts, and the bytes of the frozen weights (with buffers) and trainable ones."""
    total = trainable = head = weights_bytes = adapter_bytes = 0
    for name, p in peft_model.named_parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
            head += p.numel() if "modules_to_save." in name else 0  # a trained head (a seq_cls classifier)
            adapter_bytes += p.numel() * p.element_size()
        else:
            weights_bytes += sum(stored_bytes(p, quantized, quantization))
    weights_bytes += sum(b.numel() * b.element_size() for b in peft_model.buffers())
    params = {
        "total_params": total,
        "adapter_params": trainable - head,
        "trainable_params": trainable,
        "trainable_share": trainable / total,
        "head_params": head,
    }
    return params, {"weights_bytes": weights_bytes, "adapter_bytes": adapter_bytes}


def stored_bytes(p: Any, quantized: dict[int, tuple[int, int]], quantization: str) -> tuple[int, int]:
    """A parameter's bytes as a process stores it: (the tensor FSDP shards, what stays beside it
    whole: a quantized weight's scales and tables). Unquantized weights keep their dtype (see
    `prepare_quantized`)."""
    if id(p) in quantized:
        numel, rows = quantized[id(p)]
        data = numel if quantization == "8bit" else math.ceil(numel / 2)
        return data, quantized_bytes(numel, rows, quantization) - data
    return p.numel() * p.element_size(), 0
