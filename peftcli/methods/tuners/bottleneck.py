"""Houlsby-style bottleneck adapters as a PEFT tuner: config + layer + model + one registration.

Each targeted projection keeps its frozen weights and gains a small residual MLP on its output:

    h = W x;   out = h + up(act(down(dropout(h))))

With the attention-output and FFN-output projections as targets (`o_proj` + `down_proj` on Llama,
`attn.c_proj` + `mlp.c_proj` on GPT-2) this is the placement of Houlsby et al. (2019): one adapter
after each sub-layer, before the residual add. `up` starts at zero, so a fresh adapter leaves the
model's outputs exactly unchanged. The non-linearity makes the adapter impossible to fold into `W`:
it is served attached, through `PeftModel`.

Registered with PEFT as `bottleneck` (peft_type "BOTTLENECK", parameter prefix "bottleneck_"), so
`get_peft_model`, `save_pretrained` and `PeftModel.from_pretrained` work unchanged once this module
has been imported.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _get_in_out_features
from peft.utils import PeftType, register_peft_method
from torch import nn
from transformers.pytorch_utils import Conv1D

NAME = "bottleneck"
PEFT_TYPE = "BOTTLENECK"
PREFIX = "bottleneck_"

NonLinearity = Literal["relu", "gelu", "silu", "tanh"]
Placement = Literal["output"]
_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}

MERGE_ERROR = (
    "bottleneck adapters cannot be merged into the base weights: the adapter is a non-linear "
    "function of the layer's output, so no weight matrix equals it. Serve the model with the "
    "adapter attached (PeftModel.from_pretrained(base, adapter_dir)) instead of merge_and_unload()."
)


def _peft_type_member(name: str) -> PeftType:
    """The `PeftType` member for `name`, added if missing.

    `register_peft_method` only accepts names that are already members of PEFT's closed `PeftType`
    enum, and PEFT compares `config.peft_type` with members and reads `.value` from it, so a plain
    string will not do. Python has no public way to extend an enum; this does what `enum` itself
    does when it builds a member.
    """
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    PeftType._member_names_.append(name)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    type.__setattr__(PeftType, name, member)
    return member


@dataclass
class BottleneckConfig(PeftConfig):
    """Configuration of a [`BottleneckModel`]: Houlsby-style bottleneck adapters."""

    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Modules whose OUTPUT gets an adapter: a list of names (exact, or suffixes after a '.') "
            "or one regex matched against the full module name. Houlsby placement targets the attention "
            "output and FFN output projections, e.g. ['o_proj', 'down_proj'] (Llama) or "
            "['attn.c_proj', 'mlp.c_proj'] (GPT-2). Left unset, known architectures get exactly those."
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names or a regex of modules never to adapt."}
    )
    bottleneck_size: int = field(
        default=64,
        metadata={"help": "Hidden width m of each adapter (d -> m -> d); 2·d·m + m + d parameters."},
    )
    non_linearity: NonLinearity = field(
        default="relu",
        metadata={"help": "Activation between the down and up projections: relu|gelu|silu|tanh."},
    )
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter's input, in [0, 1)."})
    placement: Placement = field(
        default="output",
        metadata={
            "help": "Where the adapter acts: 'output' = on the targeted layer's output (the only one)."
        },
    )
    layers_to_transform: list[int] | int | None = field(
        default=None,
        metadata={"help": "Only adapt the layers with these indices (needs list target_modules)."},
    )
    layers_pattern: list[str] | str | None = field(
        default=None,
        metadata={"help": "Name of the layer list (e.g. 'layers' or 'h'); used with layers_to_transform."},
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={
            "help": "Other modules to train fully and save with the adapter (e.g. a new classifier head)."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = _peft_type_member(PEFT_TYPE)
        # PEFT's configs keep name lists as sets (order is meaningless, JSON gets a list back)
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)

        size = self.bottleneck_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(
                f"bottleneck_size must be a positive integer (the adapter width m), got {size!r}"
            )
        if self.non_linearity not in _ACTIVATIONS:
            raise ValueError(
                f"non_linearity must be one of {', '.join(get_args(NonLinearity))}, got {self.non_linearity!r}"
            )
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        if self.placement not in get_args(Placement):
            raise ValueError(
                f"placement must be one of {', '.join(get_args(Placement))}, got {self.placement!r}; "
                "target the modules whose output should be adapted instead"
            )
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("layers_to_transform cannot be used when target_modules is a regex string")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("layers_pattern only applies together with layers_to_transform; set both")


class BottleneckLayer(nn.Module, BaseTunerLayer):
    """Wraps an `nn.Linear` or GPT-2 `Conv1D` and adds bottleneck adapters to its output."""

    adapter_layer_names = ("bottleneck_down", "bottleneck_up")
    other_param_names = ("bottleneck_dropout", "bottleneck_size", "non_linearity")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: BottleneckConfig, **kwargs: Any):
        super().__init__()
        if not isinstance(base_layer, (nn.Linear, Conv1D)):
            raise TypeError(
                f"bottleneck adapters wrap nn.Linear or Conv1D layers, got {type(base_layer).__name__}; "
                "check target_modules"
            )
        self.base_layer = base_layer
        self.bottleneck_down = nn.ModuleDict({})
        self.bottleneck_up = nn.ModuleDict({})
        self.bottleneck_dropout = nn.ModuleDict({})
        self.bottleneck_size: dict[str, int] = {}
        self.non_linearity: dict[str, str] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        # Conv1D stores its weight as (in, out), so out_features is weight.shape[1]
        self.in_features, self.out_features = _get_in_out_features(base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config: BottleneckConfig, **kwargs: Any) -> None:
        d, m = self.out_features, config.bottleneck_size
        self.bottleneck_size[adapter_name] = m
        self.non_linearity[adapter_name] = config.non_linearity
        self.bottleneck_dropout[adapter_name] = (
            nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        )
        self.bottleneck_down[adapter_name] = nn.Linear(d, m, bias=True)
        up = nn.Linear(m, d, bias=True)
        # zero up-projection: the adapted model starts exactly equal to the base model
        nn.init.zeros_(up.weight)
        nn.init.zeros_(up.bias)
        self.bottleneck_up[adapter_name] = up
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise ValueError(MERGE_ERROR)

    def unmerge(self) -> None:
        # Nothing is ever merged; PEFT calls this on every layer when unmerging a model.
        return

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        # Each active adapter reads the base output and their updates add up, as LoRA's do, so the
        # result does not depend on the order in which adapters were activated.
        out = result
        for name in self.active_adapters:
            if name not in self.bottleneck_down:
                continue
            down = self.bottleneck_down[name]
            # adapters may be kept in float32 over a bf16/fp16 base (PEFT's autocast_adapter_dtype)
            h = self._cast_input_dtype(result, down.weight.dtype)
            h = self.bottleneck_up[name](
                _ACTIVATIONS[self.non_linearity[name]](down(self.bottleneck_dropout[name](h)))
            )
            out = out + h.to(result.dtype)
        return out

    def __repr__(self) -> str:
        return "bottleneck." + super().__repr__()


class BottleneckModel(BaseTuner):
    """Injects [`BottleneckLayer`]s into a model for a [`BottleneckConfig`]; use via `get_peft_model`."""

    prefix: str = PREFIX
    tuner_layer_cls = BottleneckLayer
    # Houlsby placement for architectures whose module names we know: attention out + FFN out.
    target_module_mapping = {
        "llama": ["o_proj", "down_proj"],
        "mistral": ["o_proj", "down_proj"],
        "qwen2": ["o_proj", "down_proj"],
        "qwen3": ["o_proj", "down_proj"],
        "gemma": ["o_proj", "down_proj"],
        "gemma2": ["o_proj", "down_proj"],
        "phi3": ["o_proj", "down_proj"],
        "gpt2": ["attn.c_proj", "mlp.c_proj"],
        "gpt_neox": ["attention.dense", "dense_4h_to_h"],
        "opt": ["out_proj", "fc2"],
    }

    def _create_and_replace(
        self,
        peft_config: BottleneckConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **kwargs: Any,
    ) -> None:
        if isinstance(target, BottleneckLayer):
            target.update_layer(adapter_name, peft_config)
            return
        new_module = BottleneckLayer(target, adapter_name, peft_config)
        if adapter_name not in self.active_adapters:
            # an added, inactive adapter must not start training
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _check_merge_allowed(self) -> None:
        # Raise before PEFT starts replacing modules, so a refused merge leaves the model intact.
        raise ValueError(MERGE_ERROR)


def register() -> None:
    """Register `bottleneck` with PEFT. Safe to call again, and after `importlib.reload`."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    peft_type = _peft_type_member(PEFT_TYPE)
    current = PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)
    if current is None:
        register_peft_method(
            name=NAME, config_cls=BottleneckConfig, model_cls=BottleneckModel, prefix=BottleneckModel.prefix
        )
    elif current is not BottleneckConfig:
        if (current.__module__, current.__qualname__) != (__name__, BottleneckConfig.__qualname__):
            raise RuntimeError(
                f"another PEFT method is already registered as {NAME!r} ({current.__module__}.{current.__qualname__})"
            )
        # this module was executed again (importlib.reload): point PEFT at the new classes
        warnings.warn(f"re-registering PEFT method {NAME!r} from a reloaded {__name__}", stacklevel=2)
        PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = BottleneckConfig
        PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = BottleneckModel


register()
