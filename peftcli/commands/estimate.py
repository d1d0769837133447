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
- **activations**: what the forward pass keeps for backward, at its peak: see
  peftcli.commands.estimate_activations, which derives it from the model's layers.
- **generation** (GRPO): sampling's key/value cache and logits, and the reference's forward
  pass (estimate_activations.generation). Both come before the step's training pass and keep
  nothing for it, so the total counts the larger of generation and activations.

Checked in tests/test_estimate.py against the tensors a real training step holds, counted
exactly (the same on every CPU): gradients and AdamW's moments equal the plan to the byte; the
bytes autograd keeps for backward (`saved_tensors_hooks`), with and without gradient
checkpointing, are within the small terms above, bounded from the model's shape (a Llama of
width 256: 1.2% over without checkpointing, 5% under with it; LoRA on tiny-llama, tiny-gpt2,
tiny-bert within 2%, tiny-t5 9% under: its relative position bias is not modelled). The
process's peak RSS, which also holds allocator slack and kernel workspaces, is a benchmark
figure: `make bench-memory`.
"""

from __future__ import annotations

import math
from functools import partial
from typing import TYPE_CHECKING, Any

from peftcli.commands.estimate_activations import activations, sequences, with_generation
from peftcli.console import parse_memory, quiet_libraries
from peftcli.errors import UserError
from peftcli.methods.apply import within_parts
from peftcli.model.parts import parameter_counts
from peftcli.model.quant import skip_modules
from peftcli.tasks import TASKS

if TYPE_CHECKING:
    from peftcli.recipe import Recipe

# CUDA context, cuBLAS/cuDNN workspaces and allocator slack that no tensor accounts for: 1 GiB.
GPU_RESERVE_BYTES = 2**30


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


def quantized_weights(
    model: Any, quantization: str, keep: list[str] | None = None
) -> dict[int, tuple[int, int]]:
    """id(weight) → (numel, output rows) for the weights bitsandbytes would quantize: the
    same selection transformers makes (linear layers, minus the head, tied weights and the
    model's fp32 modules, and `keep`: the recipe's modules left unquantized)."""
    if quantization == "none":
        return {}
    import torch.nn as nn
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    skip = HfQuantizer.get_modules_to_not_convert(model, keep, model._keep_in_fp32_modules)
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


# --------------------------------------------------------------------------- the estimate


def estimate(recipe: Recipe, gpu_memory: str | None = None, num_processes: int = 1) -> dict[str, Any]:
    """Parameter counts and per-process memory for the recipe, without loading weights."""
    gpu_bytes = parse_memory(gpu_memory) if gpu_memory is not None else None
    if num_processes < 1:
        raise UserError(f"--num-processes: {num_processes} must be at least 1")
    import torch

    from peftcli.checks import check_model
    from peftcli.data import label_names
    from peftcli.methods import coverage
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
    quantized = quantized_weights(base, quantization, skip_modules(recipe.model))
    peft_model = wrap_like(base, recipe.peft, recipe.model.task, total_steps=steps)
    params, memory = count_parameters(peft_model, quantized, quantization)
    params["coverage"] = coverage.of_model(peft_model)  # what the trainable parameters reach

    free = None
    if on_gpu:  # what the fused head's chunk takes a share of
        device = gpu_bytes if gpu_bytes is not None else torch.cuda.mem_get_info()[1]
        free = max(device - GPU_RESERVE_BYTES - memory["weights_bytes"] - 4 * memory["adapter_bytes"], 0)
    if TASKS[recipe.model.task].vision:  # activations of the language model: its tokens and layers
        params["parts"] = parameter_counts(peft_model.named_parameters())
        index = within_parts(index, recipe.peft.model_copy(update={"train_vision": False}), recipe.model.task)
    act = activations(recipe, base.config.get_text_config(), peft_model, index, act_bytes, on_gpu, free)
    memory.update(
        optimizer_bytes=2 * memory["adapter_bytes"],
        gradients_bytes=memory["adapter_bytes"] * (2 if num_processes > 1 else 1),
        activations_bytes=act["layers"] + act["logits"],
    )
    memory["total_bytes"] = sum(memory.values())
    gen = with_generation(memory, recipe, base.config, dtype.itemsize)  # GRPO's sampling
    result: dict[str, Any] = {
        **params,
        "memory": memory,
        "activations": {
            "layers_bytes": act["layers"],
            "logits_bytes": act["logits"],
            "logits_saved_bytes": act["saved"],
            "tokens": act["tokens"],
        },
        **({"generation": gen} if gen is not None else {}),
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
    from peftcli.methods.init_table import variants_set

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
        **sequences(recipe),
        "gradient_checkpointing": recipe.training.gradient_checkpointing,
        "num_processes": num_processes,
        "variants": variants_set(recipe.peft),  # init, rslora, LoRA+, rank/alpha patterns
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
