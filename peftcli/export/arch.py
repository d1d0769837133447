"""Architectures a GGUF file can hold: one row per transformers `model_type`.

A row says which llama.cpp architecture (`gguf.MODEL_ARCH`) the model becomes, which
hyperparameters its metadata carries, and how a tensor's layout differs from transformers'.
Tensor *names* come from gguf-py's own map (`gguf.get_tensor_name_map`); the hyperparameter
keys and the two layout changes below are what llama.cpp's `convert_hf_to_gguf.py` does, which
is a script in llama.cpp's repository, not part of the `gguf` package, so they are written here:

- Llama-architecture files store the rows of the query and key projections in the order of
  llama.cpp's rotary embedding (pairs of adjacent dimensions), not transformers' (two halves);
  Qwen2/Qwen3 files keep transformers' order (llama.cpp applies NeoX-style rotation to them).
- GPT-2 stores its linear layers as `Conv1D` (input × output); GGUF stores output × input.

An architecture that has no row is refused before any weight is read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from peftcli.errors import UserError


def _rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0)


def _rope_type(config: Any) -> str:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return str(params.get("rope_type") or params.get("type") or "default")


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _llama_family(config: Any, writer: Any) -> None:
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_rope_dimension_count(_head_dim(config))
    writer.add_key_length(_head_dim(config))
    writer.add_value_length(_head_dim(config))
    writer.add_vocab_size(config.vocab_size)


def _gpt2(config: Any, writer: Any) -> None:
    writer.add_context_length(config.n_positions)
    writer.add_embedding_length(config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
    writer.add_head_count(config.n_head)
    writer.add_layer_norm_eps(config.layer_norm_epsilon)


def _rope_order(name: str, data: Any, config: Any) -> Any:
    """transformers' rotary halves → llama.cpp's adjacent pairs, per head (query and key rows)."""
    if ".attn_q." in name:
        heads = config.num_attention_heads
    elif ".attn_k." in name:
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    else:
        return data
    rows = data.shape[0]
    return data.reshape(heads, 2, rows // heads // 2, *data.shape[1:]).swapaxes(1, 2).reshape(data.shape)


CONV1D = (".attn_qkv.weight", ".attn_output.weight", ".ffn_up.weight", ".ffn_down.weight")


def _conv1d(name: str, data: Any, config: Any) -> Any:
    return data.T if name.endswith(CONV1D) else data


def _unchanged(name: str, data: Any, config: Any) -> Any:
    return data


@dataclass(frozen=True)
class Arch:
    model_type: str  # transformers' config.model_type
    gguf_arch: str  # the member of gguf.MODEL_ARCH
    hparams: Callable[[Any, Any], None]  # (config, GGUFWriter): the metadata keys
    layout: Callable[[str, Any, Any], Any] = _unchanged  # (GGUF name, float32 array, config)
    layers: str = "num_hidden_layers"
    checks: tuple[Callable[[Any], str | None], ...] = ()  # each: why this config cannot be written


def _plain_rope(config: Any) -> str | None:
    kind = _rope_type(config)
    return None if kind == "default" else f"rope scaling `{kind}` is not written yet"


ARCHS: dict[str, Arch] = {
    a.model_type: a
    for a in [
        Arch("llama", "LLAMA", _llama_family, _rope_order, checks=(_plain_rope,)),
        # llama.cpp reads Mistral as Llama (its sliding window, 4096 tokens, is not carried).
        Arch("mistral", "LLAMA", _llama_family, _rope_order, checks=(_plain_rope,)),
        Arch("qwen2", "QWEN2", _llama_family, checks=(_plain_rope,)),
        Arch("qwen3", "QWEN3", _llama_family, checks=(_plain_rope,)),
        Arch("gpt2", "GPT2", _gpt2, _conv1d, layers="n_layer"),
    ]
}


def arch_of(config: Any, path: Any) -> Arch:
    """The row for this model config; refuses an architecture or setting GGUF export lacks."""
    model_type = getattr(config, "model_type", None)
    row = ARCHS.get(model_type)
    if row is None:
        raise UserError(
            f"{path}: cannot export a `{model_type}` model to GGUF; peftcli writes {', '.join(ARCHS)} models",
            "merge it with `peftcli merge` and convert that folder with llama.cpp's convert_hf_to_gguf.py",
        )
    for check in row.checks:
        if why := check(config):
            raise UserError(f"{path}: cannot export this {model_type} model to GGUF: {why}")
    return row


def tensors(model: Any, row: Arch) -> Any:
    """(GGUF name, float32 numpy array) for every weight of `model`, in the GGUF layout. A tied
    output head is left out: GGUF readers tie it back when `output.weight` is missing."""
    import gguf
    import torch

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[row.gguf_arch], getattr(config, row.layers))
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, tensor in model.state_dict().items():
        module, _, suffix = hf_name.rpartition(".")
        name = names.get_name(module)
        if name == "output" and tied:
            continue
        if name is None:  # a bug: the row accepted a model whose tensors it cannot name
            raise RuntimeError(f"no GGUF name for the {row.model_type} tensor {hf_name}")
        name = f"{name}.{suffix}"
        data = tensor.detach().to(device="cpu", dtype=torch.float32).numpy()
        yield name, row.layout(name, data, config)
