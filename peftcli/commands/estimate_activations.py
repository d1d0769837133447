"""`peftcli estimate`'s activations: what the forward pass keeps for backward, at its peak (the
start of the backward pass), for `T = batch_size × max_length` tokens (the padded worst case). Per token
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
(`fused_rows`: 1/8 of the GPU memory the rest of the plan leaves, at most 32 MiB on a CPU). Other
language-model heads take 12 bytes per position per vocabulary entry: the fp32
log-probabilities kept for the loss's backward, the incoming gradient and the gradient of the
logits alive together when backward starts. Both count every position; with `train_on: completion` only the positions
that predict a supervised token reach the head, so there they are upper bounds. With
gradient checkpointing only each layer's input (h per token) is kept, plus one layer's
activations while it is recomputed.
Small terms (norm statistics, LoRA's rank-r intermediates) are left out. The formula
assumes every projection's input is kept, as LoRA-style methods on every linear layer keep
it; with fewer adapted modules it is an upper bound (prompt tuning keeps ~25% less).
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from peftcli.objectives import OBJECTIVES, sequences_per_example

if TYPE_CHECKING:
    from peftcli.methods.targets import LinearIndex
    from peftcli.recipe import Recipe

_LAYER_PREFIX = re.compile(r"^(.*?\.\d+)\.")


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
    batch, length = sequences(recipe).values()
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
    if (
        task == "causal_lm"
        and head is not None
        and fusable(head)
        and OBJECTIVES[recipe.training.objective].task_loss
    ):
        # Fused head + cross-entropy: the gradient of the head's input is kept; one chunk
        # of logits (in the activation dtype, then float32 in place) lives at a time.
        saved = tokens * config.hidden_size * act_bytes
        rows = fused_rows(vocab, "cuda" if free is not None else "cpu", free)
        chunk = min(tokens, rows) * vocab * (4 + (act_bytes if act_bytes < 4 else 0))
        return {"logits": saved + chunk, "saved": saved}
    return {"logits": 12 * tokens * vocab, "saved": 4 * tokens * vocab}


def sequences(recipe: Recipe) -> dict[str, int]:
    """One micro-batch's sequences and their longest length: preference pairs are 2 sequences
    each (chosen and rejected, in one batch); GRPO's are each prompt's group of sampled answers,
    prompt + max_new_tokens long."""
    n = recipe.training.batch_size * sequences_per_example(recipe.training.objective)
    length = recipe.data.max_length
    if OBJECTIVES[recipe.training.objective].generates:
        return {
            "sequences": n * recipe.grpo.num_generations,
            "max_length": length + recipe.grpo.max_new_tokens,
        }
    return {"sequences": n, "max_length": length}


def kv_cache_bytes(config: Any, rows: int, positions: int, dtype_bytes: int) -> int:
    """The key/value cache `generate` holds for `rows` sequences of `positions` cached tokens:
    layers × 2 (keys and values) × key/value heads × head dim × bytes per value × positions."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return text.num_hidden_layers * 2 * kv_heads * head_dim * dtype_bytes * rows * positions


def generation(recipe: Recipe, config: Any, dtype_bytes: int) -> dict[str, int]:
    """GRPO's memory before each step's training pass, without gradients: sampling (the KV cache
    of batch × num_generations sequences, prompt + max_new_tokens − 1 positions each: the last
    sampled token is never fed back; and one step's logits: in the model's dtype, generate's
    float32 copy, the float64 Gumbel noise and noisy scores; prompt learning samples without a
    cache, each token a forward pass with logits at every position) and, with a KL term, the
    reference's forward pass (its logits over whole sequences, the answers' float32 log-softmax)."""
    from peftcli.methods import METHODS

    s, method = recipe.grpo, METHODS[recipe.peft.method]
    rows = recipe.training.batch_size * s.num_generations
    prompt = recipe.data.max_length
    if method.kind == "prompt":  # virtual tokens are cached positions too
        prompt += int(
            recipe.peft.options.get("num_virtual_tokens", method.defaults.get("num_virtual_tokens", 0))
        )
    positions = prompt + s.max_new_tokens - 1
    vocab = config.get_text_config().vocab_size if hasattr(config, "get_text_config") else config.vocab_size
    step_logits = rows * vocab * (dtype_bytes + 4 + 8 + 8)
    if method.kind == "prompt":  # sampled without a cache (see GRPO.sample): whole forward passes
        kv, step_logits = 0, step_logits + rows * positions * vocab * dtype_bytes
    else:
        kv = kv_cache_bytes(config, rows, positions, dtype_bytes)
    reference = 0
    if s.beta != 0.0:
        whole = prompt + s.max_new_tokens
        reference = rows * whole * vocab * dtype_bytes + 2 * rows * s.max_new_tokens * vocab * 4
    return {
        "rows": rows,
        "cached_positions": positions,
        "kv_cache": kv,
        "sampling": kv + step_logits,
        "reference": reference,
        "peak": max(kv + step_logits, reference),
    }


def with_generation(
    memory: dict[str, int], recipe: Recipe, config: Any, dtype_bytes: int
) -> dict[str, int] | None:
    """For an objective that samples (GRPO): its generation memory, added to `memory`. Sampling
    and the reference pass come before each step's training pass and keep nothing for it, so the
    total counts the larger of generation and activations. None for the others."""
    if not OBJECTIVES[recipe.training.objective].generates:
        return None
    gen = generation(recipe, config, dtype_bytes)
    memory["generation_bytes"] = gen["peak"]
    memory["total_bytes"] += max(gen["peak"] - memory["activations_bytes"], 0)
    return gen
