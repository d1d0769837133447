"""Which linear modules a model has, and which of them a recipe's `target_modules` picks.

The inventory comes from a loaded (or meta-device) model, or — without importing torch —
from the parameter names in a checkpoint's safetensors headers, so `peftcli validate` can
check targets in well under a second.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftcli.errors import UserError, did_you_mean

if TYPE_CHECKING:
    import torch.nn as nn

TARGET_KEYWORDS = (
    "all-linear",
    "attention",
    "mlp",
    "keys-values",
    "attention-output",
    "mlp-output",
    "experts",
    "router",
)
# Reached through PEFT's `target_parameters` (LoRA only): parameters that are no linear layer's.
PARAMETER_KEYWORDS = ("experts", "router")
ROUTER_NAMES = {"gate", "router"}
# Method defaults are chosen structurally; these names only tell the q/k/v projections (fused
# or not) apart from an attention block's output projection.
QUERY_NAMES = {"q_proj", "query", "q", "wq"}
KEY_VALUE_NAMES = {
    "k_proj",
    "v_proj",
    "key",
    "value",
    "k",
    "v",
    "wk",
    "wv",
    "c_attn",
    "query_key_value",
    "qkv_proj",
    "Wqkv",
    "qkv",
}  # the last ones are fused q/k/v
CONV1D_MODEL_TYPES = {"gpt2", "openai-gpt", "imagegpt", "decision_transformer"}  # weights stored (in, out)
HEAD_NAMES = {"lm_head", "score", "classifier", "qa_outputs"}
EMBEDDING_NAMES = {
    "embed_tokens",
    "wte",
    "wpe",
    "word_embeddings",
    "position_embeddings",
    "token_type_embeddings",
    "shared",
    "embed_positions",
    "relative_attention_bias",
}
_LAYER_RE = re.compile(r"(?:^|\.)(?P<pattern>[A-Za-z_]\w*)\.(?P<idx>\d+)\.")


def layer_index(name: str) -> tuple[str, int] | None:
    """('layers', 3) for 'model.layers.3.self_attn.q_proj'."""
    match = _LAYER_RE.search(name)
    return (match["pattern"], int(match["idx"])) if match else None


def _attention_segment(segment: str) -> bool:
    s = segment.lower()
    return "attn" in s or "attention" in s


@dataclass
class LinearIndex:
    """The linear modules of a model (output heads excluded) and those inside attention; and the
    parameters LoRA reaches outside linear layers: a mixture-of-experts block's fused expert
    tensors (3-D, one slice per expert) and its router's weight, where they are no nn.Linear."""

    names: list[str]
    attention: set[str] = field(default_factory=set)
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (in_features, out_features)
    experts: dict[str, tuple[int, ...]] = field(default_factory=dict)  # parameter name -> shape
    routers: dict[str, tuple[int, ...]] = field(default_factory=dict)
    outside: list[str] = field(default_factory=list)  # linears left out (a vision tower): never targeted

    @property
    def num_layers(self) -> int:
        indices = [li[1] for n in self.names if (li := layer_index(n))]
        return max(indices) + 1 if indices else 0

    @classmethod
    def from_model(cls, model: nn.Module) -> LinearIndex:
        import torch.nn as nn
        from transformers.pytorch_utils import Conv1D

        heads = {name for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] in HEAD_NAMES}
        out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        heads |= {name for name, m in model.named_modules() if out is not None and m is out}
        names, attention, shapes = [], set(), {}
        modules = dict(model.named_modules())
        for name, module in modules.items():
            # bitsandbytes' Linear4bit / Linear8bitLt subclass nn.Linear; GPT-2 uses Conv1D.
            if not isinstance(module, nn.Linear | Conv1D):
                continue
            if any(name == h or name.startswith(h + ".") for h in heads):
                continue
            names.append(name)
            w = module.weight.shape
            shapes[name] = (
                (w[0], w[1]) if isinstance(module, Conv1D) else (module.in_features, module.out_features)
            )
            parts = name.split(".")
            for i in range(1, len(parts)):
                parent = modules[".".join(parts[:i])]
                if _attention_segment(parts[i - 1]) or "attention" in type(parent).__name__.lower():
                    attention.add(name)
                    break
        return cls(names, attention, shapes, *_expert_parameters(modules))

    @staticmethod
    def has_experts(folder: Path) -> bool:
        """Whether a checkpoint holds mixture-of-experts weights. transformers 5 saves them one
        linear per expert (`experts.0.w1`) and fuses them into 3-D parameters when it loads, so
        their headers do not tell what a loaded model's targets are."""
        return any(
            len(shape) == 3 or re.search(r"\.experts\.\d+\.", key)
            for key, shape in safetensors_shapes(folder).items()
        )

    @classmethod
    def from_weights(cls, folder: Path) -> LinearIndex | None:
        """From safetensors headers alone; None when the folder has no readable safetensors."""
        tensors = safetensors_shapes(folder)
        if not tensors:
            return None
        try:
            model_type = json.loads((folder / "config.json").read_text()).get("model_type")
        except (OSError, ValueError):
            model_type = None
        names, shapes = [], {}
        for key, shape in tensors.items():
            if not key.endswith(".weight") or len(shape) != 2:
                continue
            module = key[: -len(".weight")]
            parts = module.split(".")
            if parts[-1] in EMBEDDING_NAMES or parts[-1] in HEAD_NAMES:
                continue
            names.append(module)
            # PyTorch stores Linear weights (out, in); GPT-2's Conv1D stores them (in, out).
            shapes[module] = (
                (shape[0], shape[1]) if model_type in CONV1D_MODEL_TYPES else (shape[1], shape[0])
            )
        attention = {n for n in names if any(_attention_segment(p) for p in n.split(".")[:-1])}
        return cls(sorted(names), attention, shapes)

    # -- structural groups, used for the methods' default targets

    def keys_values(self) -> set[str]:
        return {n for n in self.attention if n.rsplit(".", 1)[-1] in KEY_VALUE_NAMES}

    def attention_outputs(self) -> set[str]:
        qkv = QUERY_NAMES | KEY_VALUE_NAMES
        return {n for n in self.attention if n.rsplit(".", 1)[-1] not in qkv}

    def mlp_outputs(self) -> set[str]:
        """FFN down projections: the MLP linears that map a wider space back to the model width."""
        return {
            n
            for n in self.names
            if layer_index(n) and n not in self.attention and self.shapes[n][0] > self.shapes[n][1]
        }


def _expert_parameters(
    modules: dict[str, nn.Module],
) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """Fused expert tensors (3-D parameters of an `experts` module) and routers (the weight of a
    non-linear `gate` or `router` module beside an `experts` one), by parameter name."""
    import torch.nn as nn
    from transformers.pytorch_utils import Conv1D

    experts, routers = {}, {}
    for name, module in modules.items():
        if isinstance(module, nn.Linear | Conv1D | nn.Embedding):
            continue
        parent, _, leaf = name.rpartition(".")
        beside_experts = leaf in ROUTER_NAMES and f"{parent}.experts" in modules
        for pname, p in module.named_parameters(recurse=False):
            full = f"{name}.{pname}" if name else pname
            if p.ndim == 3 and "experts" in name.split("."):  # one slice per expert
                experts[full] = tuple(p.shape)
            elif p.ndim == 2 and pname == "weight" and beside_experts:
                routers[full] = tuple(p.shape)
    return experts, routers


def _select_parameters(index: LinearIndex, entry: str) -> set[str]:
    """The expert or router parameters a `target_modules` entry names: a keyword, a parameter
    name (suffix, e.g. gate_up_proj) or a regex over full names."""
    params = {**index.experts, **index.routers}
    if entry == "experts":
        return set(index.experts)
    if entry == "router":
        return set(index.routers)
    found = {n for n in params if n == entry or n.endswith("." + entry)}
    if not found:
        try:
            found = {n for n in params if re.fullmatch(entry, n)}
        except re.error:
            pass
    return found


def safetensors_shapes(folder: Path) -> dict[str, list[int]]:
    """Tensor name → shape from the headers of a folder's safetensors files (no torch)."""
    files = sorted(folder.glob("*.safetensors"))
    shapes: dict[str, list[int]] = {}
    for path in files:
        try:
            with path.open("rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                if length > path.stat().st_size:  # not a safetensors file: don't read "length" bytes
                    return {}
                header = json.loads(f.read(length))
        except (OSError, ValueError, struct.error):
            return {}
        shapes.update({k: v["shape"] for k, v in header.items() if k != "__metadata__"})
    return shapes


def _select(index: LinearIndex, entry: str) -> set[str]:
    if entry == "all-linear":
        return set(index.names)
    if entry == "attention":
        return {n for n in index.names if layer_index(n) and n in index.attention}
    if entry == "mlp":
        return {n for n in index.names if layer_index(n) and n not in index.attention}
    if entry == "keys-values":
        return index.keys_values()
    if entry == "attention-output":
        return index.attention_outputs()
    if entry == "mlp-output":
        return index.mlp_outputs()
    if entry == "experts":  # experts that are linear layers (not fused)
        return {n for n in index.names if ".experts." in n}
    if entry == "router":
        return {
            n
            for n in index.names
            if n.rsplit(".", 1)[-1] in ROUTER_NAMES
            and any(m.startswith(n.rsplit(".", 1)[0] + ".experts.") for m in index.names)
        }
    found = {n for n in index.names if n == entry or n.endswith("." + entry)}
    if not found:
        try:
            found = {n for n in index.names if re.fullmatch(entry, n)}
        except re.error:
            pass
    return found


def resolve_targets(
    index: LinearIndex,
    target_modules: list[str] | str | None,
    layers: list[int] | None,
    default: list[str] | str = "all-linear",
) -> dict[str, Any]:
    """The PEFT config kwargs for the recipe's targets.

    Returns `target_modules` (module suffixes when they select exactly the chosen set, else
    full names), `layers_to_transform` + `layers_pattern` when layers are restricted, and
    `names`: the exact modules adapted. Fused expert and router parameters (`experts`,
    `router`, or their names) come as PEFT's `target_parameters`, with `parameters` the exact
    ones adapted.
    """
    spec = default if target_modules is None else target_modules
    entries = [spec] if isinstance(spec, str) else list(spec)
    if not entries:
        raise UserError("peft.target_modules is an empty list", "leave it out for the method's default")
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in [*index.names, *index.experts, *index.routers]})
    chosen: set[str] = set()
    params: set[str] = set()
    for entry in entries:
        hit, hit_params = _select(index, entry), _select_parameters(index, entry)
        if not hit and not hit_params:
            raise UserError(
                f"peft.target_modules: `{entry}` matches no linear module{did_you_mean(entry, suffixes)}; "
                f"this model has {', '.join(suffixes)} (or use {', '.join(TARGET_KEYWORDS)})"
            )
        chosen |= hit
        params |= hit_params

    wanted: list[int] | None = None
    if layers is not None:
        n = index.num_layers
        if not layers:
            raise UserError("peft.layers is an empty list", "leave it out to adapt every layer")
        bad = [i for i in layers if not -n <= i < n]
        if bad:
            raise UserError(
                f"peft.layers: {bad} out of range; the model has {n} layers (0..{n - 1}, or -1..-{n})"
            )
        wanted = sorted({i % n for i in layers})
        chosen = {c for c in chosen if (li := layer_index(c)) and li[1] in wanted}
        params = {c for c in params if (li := layer_index(c)) and li[1] in wanted}
        if not chosen and not params:
            raise UserError("peft.layers: none of the target modules lies in those layers")
    extra = _parameter_targets(index, params, wanted)
    if not chosen:  # parameters only: PEFT takes an empty list as "no modules"
        return {"target_modules": [], "names": [], **extra}

    # Prefer the short, portable form (module suffixes) when it selects exactly the same set.
    short = sorted({c.rsplit(".", 1)[-1] for c in chosen})
    same = {n for n in [*index.names, *index.outside] if n.rsplit(".", 1)[-1] in short}
    if wanted is not None:
        same = {n for n in same if (li := layer_index(n)) and li[1] in wanted}
    if same != chosen:
        return {"target_modules": sorted(chosen), "names": sorted(chosen), **extra}
    out: dict[str, Any] = {"target_modules": short, "names": sorted(chosen), **extra}
    if wanted is not None:
        out["layers_to_transform"] = wanted
        out["layers_pattern"] = sorted({li[0] for c in chosen if (li := layer_index(c))})
    return out


def _parameter_targets(index: LinearIndex, params: set[str], wanted: list[int] | None) -> dict[str, Any]:
    """PEFT's `target_parameters` for the chosen parameters: `experts.gate_up_proj`-style
    suffixes when they select exactly these (and no layer restriction, which PEFT does not apply
    to parameters), else full names."""
    if not params:
        return {}
    pool = {**index.experts, **index.routers}
    short = sorted({".".join(n.split(".")[-2:]) for n in params})
    same = {n for n in pool if any(n == s or n.endswith("." + s) for s in short)}
    names = sorted(params)
    return {"target_parameters": short if wanted is None and same == params else names, "parameters": names}
