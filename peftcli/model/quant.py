"""Quantized bases: the bitsandbytes config for `model.quantization`, and what a loaded 4/8-bit
model needs before it trains.

On CPUs with AVX-512 BF16 (bitsandbytes' `has_avx512bf16()`: Intel Sapphire Rapids and later,
AMD Zen 4 and later), bitsandbytes 0.50 repacks a 4-bit weight in place the first time a
`Linear4bit` runs in eval mode on an input that needs no grad (nn/modules.py:613-620), for a
fused bf16 kernel. That packed path breaks training in three ways:

1. The repack (functional.py:1676 `_convert_weight_packed_for_cpu`) needs out_features to be a
   multiple of 32 (:1696) and in_features a multiple of the quantization blocksize: it reshapes
   the per-block scales to [out, in // blocksize] (:1720). Llama's down_proj with 352 inputs
   (5.5 blocks of 64) raised `shape '[128, 5]' is invalid for input of size 704` in the first
   evaluation, after training, before the adapter was saved.
2. Nothing unpacks a weight for training, and the packed kernel has no backward
   (autograd/_functions.py:422): after one evaluation every later step silently lost the
   gradient through the frozen layers.
3. Adapters that read the base weight as a matrix (DoRA's weight norm) read the packed bytes as
   the usual layout: wrong numbers, no error. And the kernel computes in bf16 whatever the
   compute dtype, so an evaluation's numbers would depend on the CPU.

So peftcli turns it off (`portable_kernels`): every 4-bit layer takes the dequantize-and-matmul
path that training takes anyway, the same on every CPU, and an evaluation equals the training
forward. The cost is CPU inference speed of 4-bit models (one token through a 4096×4096 layer on
one Xeon core: 43 ms instead of 1.4 ms); on GPUs nothing changes. 8-bit layers have no packed
CPU path (int8 matmuls accept any shape).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from peftcli.errors import UserError
from peftcli.model.parts import PROJECTOR_NAMES, VISION_NAMES
from peftcli.tasks import TASKS

if TYPE_CHECKING:
    from peftcli.recipe import ModelSection


# The classification heads of transformers' *ForSequenceClassification models, by attribute name.
CLASSIFIER_HEADS = ("classifier", "score", "classification_head")


def quantization_config(section: ModelSection, dtype: Any) -> Any:
    """The BitsAndBytesConfig for `model.quantization` (None for none); 4-bit computes and stores in
    `dtype`, the weights' dtype."""
    if section.quantization == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError(
            f"model.quantization: {section.quantization} needs bitsandbytes",
            "pip install 'bitsandbytes>=0.48'",
        ) from None
    from transformers import BitsAndBytesConfig

    modules = skip_modules(section)
    skip = {"llm_int8_skip_modules": modules} if modules is not None else {}
    if section.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, **skip)
    return BitsAndBytesConfig(
        **skip,
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=dtype,
    )


def skip_modules(section: ModelSection) -> list[str] | None:
    """The modules bitsandbytes leaves unquantized beyond its defaults (None: its defaults)."""
    if section.task == "seq_cls":
        # A classifier's head is created fresh and trained in full precision (PEFT's
        # modules_to_save); quantizing it would leave an uninitialised 4/8-bit layer.
        return list(CLASSIFIER_HEADS)
    if TASKS[section.task].vision:
        # The language model only, as peers do: the vision tower and the projector keep their
        # dtype (the head too, as for a text model). transformers 5 matches a name from the
        # start or as a suffix (regexes allowed), older releases as a substring.
        parts = [*VISION_NAMES, *PROJECTOR_NAMES]
        return [*parts, *(f".*{p}" for p in parts), "lm_head"]
    return None


def prepare_quantized(model: Any) -> Any:
    """What a freshly loaded 4/8-bit model needs before PEFT wraps it and it trains: every base
    parameter frozen, every 4-bit layer on the portable path.

    Unlike PEFT's `prepare_model_for_kbit_training`, the unquantized weights — embeddings, the
    output head, the norms, a classifier head — stay in the compute dtype (`model.dtype`), as
    unsloth keeps them, and as a LoRA model of that dtype holds them. PEFT's fp32 copies cost
    Llama-3.1-8B 2.1 GB (its 128k-entry embeddings and head are 1.05 B weights) and made QLoRA
    peak above LoRA on a GPU, while under bf16 autocast the matmuls that read them run in bf16
    anyway. The adapters stay in fp32 (PEFT's `autocast_adapter_dtype`). Gradients reach them
    through the frozen embeddings without an upcast; with gradient checkpointing the training
    stage makes the embeddings' output require grad (`enable_input_require_grads`)."""
    for p in model.parameters():
        p.requires_grad_(False)
    portable_kernels(model)
    return model


def portable_kernels(model: Any) -> int:
    """Keep every 4-bit layer of `model` off bitsandbytes' packed CPU path (see the module doc).
    Called before any forward, so no weight is packed yet. Returns how many layers had it on."""
    import bitsandbytes as bnb

    turned_off = 0
    for layer in model.modules():
        if isinstance(layer, bnb.nn.Linear4bit) and getattr(layer, "support_avx512bf16_for_cpu", False):
            layer.support_avx512bf16_for_cpu = False
            turned_off += 1
    return turned_off
