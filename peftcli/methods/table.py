"""The methods: one row per `peft.method`, holding everything peftcli knows about it — its PEFT
config and type, what it refuses, whether it merges and combines, and its training hooks.

Adding a method is adding a row (and a tuner under `tuners/` if PEFT lacks it). Imports nothing
heavy, so the recipe schema, `validate` and `methods` stay fast; the functions a row names live
in `hooks.py` and import torch only when they run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from peftcli.methods import hooks
from peftcli.tasks import TASKS

if TYPE_CHECKING:
    import torch

Kind = Literal["targets", "prompt", "adaption"]
# Prompt learning is offered for text only: peftcli decodes it by whole forward passes
# (methods/generation.py), which take token ids alone, not a vision-language model's images.
TEXT_TASKS = frozenset(t for t, spec in TASKS.items() if not spec.vision)


@dataclass(frozen=True)
class CheckpointState:
    """Training state a method keeps outside its weights, saved in every checkpoint as `file`."""

    file: str
    save: Callable[[Any], dict[str, Any] | None]  # PeftModel -> tensors (None: nothing to save)
    load: Callable[[Any, dict[str, Any]], None]  # puts the saved tensors back on the PeftModel


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    config_class: str  # a class of `peft` (or of peftcli.methods.tuners for peftcli's own methods)
    merges: bool  # can the adapter be folded into the base weights?
    peft_type: str  # adapter_config.json's peft_type
    combines: bool = False  # PEFT's add_weighted_adapter combines several of its adapters
    kind: Kind = "targets"  # targets: adapts modules; prompt: virtual tokens; adaption: gated prompts
    # The recipe's generic keys (r, alpha, dropout) and the config field each one sets.
    generic: dict[str, str] = field(default_factory=dict)
    fixed: dict[str, Any] = field(default_factory=dict)  # config values the method implies
    defaults: dict[str, Any] = field(default_factory=dict)  # config defaults peftcli chooses
    default_targets: tuple[str, ...] = ("all-linear",)
    tasks: frozenset[str] = frozenset(TASKS)
    model_types: frozenset[str] | None = None  # None = any architecture
    quantized_base: bool = True  # works on a 4/8-bit base
    implies_quantization: Literal["4bit", "8bit"] | None = None  # model.quantization it sets
    conv1d: bool = True  # can adapt GPT-2-style Conv1D layers
    parameters: bool = False  # adapts fused MoE expert and router parameters (PEFT's target_parameters)
    kv_prefix: bool = False  # feeds trained key/values through the model's `past_key_values`
    derive: Callable[[hooks.Context], dict[str, Any]] | None = None  # config values from model/run
    step_hook: Callable[[Any, int], None] | None = None  # (PeftModel, step) after each optimizer step
    penalty: Callable[[Any], torch.Tensor] | None = None  # loss term added once per optimizer step
    state: CheckpointState | None = None
    # Trains under FSDP (tested on CPU: 2 sharded processes give the 1-process losses). AdaLoRA's
    # and VeRA's bookkeeping and the prompt methods' encoders mix sharded and whole tensors.
    shards: bool = True


_LORA_KEYS = {"r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout"}
_LYCORIS_KEYS = {"r": "r", "alpha": "alpha", "dropout": "rank_dropout"}
_PROMPT_DEFAULTS = {"num_virtual_tokens": 16}

METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method(
            "lora",
            "low-rank update B·A added to target linears",
            "LoraConfig",
            True,
            peft_type="LORA",
            combines=True,
            generic=_LORA_KEYS,
            parameters=True,
        ),
        Method(
            "qlora",
            "LoRA on a 4-bit NF4 base (implies model.quantization: 4bit)",
            "LoraConfig",
            True,
            # An adapter folder does not say its base was quantized: it reads as lora.
            peft_type="LORA",
            combines=True,
            generic=_LORA_KEYS,
            implies_quantization="4bit",
            parameters=True,
        ),
        Method(
            "dora",
            "weight-decomposed LoRA: magnitude vector + low-rank direction",
            "LoraConfig",
            True,
            peft_type="LORA",
            generic=_LORA_KEYS,
            fixed={"use_dora": True},
        ),
        Method(
            "adalora",
            "LoRA whose rank budget is reallocated by SVD importance during training",
            "AdaLoraConfig",
            True,
            peft_type="ADALORA",
            generic={"r": "init_r", "alpha": "lora_alpha", "dropout": "lora_dropout"},
            derive=hooks.adalora_schedule,
            step_hook=hooks.adalora_allocate,
            penalty=hooks.adalora_orthogonality,
            state=CheckpointState(
                "adalora.pt", hooks.adalora_allocator_state, hooks.restore_adalora_allocator
            ),
            shards=False,
        ),
        Method(
            "ia3",
            "learned scaling vectors on keys, values and the FFN down projection",
            "IA3Config",
            True,
            peft_type="IA3",
            default_targets=("keys-values", "mlp-output"),
            derive=hooks.ia3_feedforward,
        ),
        Method(
            "loha",
            "low-rank Hadamard product update (LyCORIS)",
            "LoHaConfig",
            True,
            peft_type="LOHA",
            generic=_LYCORIS_KEYS,
            conv1d=False,
            quantized_base=False,  # PEFT's LyCORIS layers read the packed 4-bit weight as a matrix
        ),
        Method(
            "lokr",
            "low-rank Kronecker product update (LyCORIS)",
            "LoKrConfig",
            True,
            peft_type="LOKR",
            generic=_LYCORIS_KEYS,
            conv1d=False,
            quantized_base=False,  # PEFT's LyCORIS layers read the packed 4-bit weight as a matrix
        ),
        Method(
            "vera",
            "shared frozen random low-rank matrices with trained scaling vectors",
            "VeraConfig",
            True,
            peft_type="VERA",
            generic={"r": "r", "dropout": "vera_dropout"},
            defaults={"r": 64},
            shards=False,
        ),
        Method(
            "oft",
            "orthogonal fine-tuning: block-diagonal orthogonal rotation of the weights",
            "OFTConfig",
            True,
            peft_type="OFT",
            # PEFT's own default: blocks of 32 (so the rotation's cost does not grow with width).
            generic={"dropout": "module_dropout"},
            defaults={"oft_block_size": 32, "r": 0},
            conv1d=False,
        ),
        Method(
            "adapter",
            "Houlsby bottleneck adapters: down-projection, nonlinearity, up-projection, residual",
            "BottleneckConfig",
            False,
            peft_type="BOTTLENECK",
            generic={"r": "bottleneck_size", "dropout": "dropout"},
            default_targets=("attention-output", "mlp-output"),
        ),
        Method(
            "prompt-tuning",
            "trained soft-prompt embeddings prepended to the input",
            "PromptTuningConfig",
            False,
            peft_type="PROMPT_TUNING",
            kind="prompt",
            tasks=TEXT_TASKS,
            defaults=_PROMPT_DEFAULTS,
            derive=hooks.prompt_tokenizer,
            shards=False,
        ),
        Method(
            "p-tuning",
            "soft prompt produced by a small trained encoder (MLP or LSTM)",
            "PromptEncoderConfig",
            False,
            peft_type="P_TUNING",
            kind="prompt",
            tasks=TEXT_TASKS,
            defaults={**_PROMPT_DEFAULTS, "encoder_hidden_size": 128},
            shards=False,
        ),
        Method(
            "prefix-tuning",
            "trained key/value prefixes at every layer",
            "PrefixTuningConfig",
            False,
            peft_type="PREFIX_TUNING",
            kind="prompt",
            tasks=TEXT_TASKS,
            defaults=_PROMPT_DEFAULTS,
            kv_prefix=True,
            shards=False,
        ),
        Method(
            "llama-adapter",
            "adaption prompts with zero-init gating in the top layers (LLaMA-Adapter)",
            "AdaptionPromptConfig",
            False,
            peft_type="ADAPTION_PROMPT",
            kind="adaption",
            defaults={"adapter_len": 10},
            tasks=frozenset({"causal_lm"}),
            model_types=frozenset({"llama", "mistral", "gpt2"}),
            quantized_base=False,
            derive=hooks.llama_adapter_layers,
        ),
    ]
}


def canonical_method(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def method_of(peft_type: str, config: Mapping[str, Any]) -> Method | None:
    """The method that wrote an adapter, from its PEFT config (adapter_config.json's contents):
    the row of its peft_type whose fixed values it has most of (LORA with use_dora is dora);
    among equals the first row (plain LORA is lora)."""
    rows = [
        m
        for m in METHODS.values()
        if m.peft_type == peft_type and all(config.get(k) == v for k, v in m.fixed.items())
    ]
    return max(rows, key=lambda m: len(m.fixed), default=None)
