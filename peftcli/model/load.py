"""Model stage: tokenizer, config and weights from `recipe.model`.

A hub id, a local folder and a builtin model all go through the same `from_pretrained`
calls; builtins are only materialised into a folder first.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftcli.console import is_main_process, say
from peftcli.errors import UserError
from peftcli.model import builtin
from peftcli.model.quant import prepare_quantized, quantization_config
from peftcli.tasks import TASKS

if TYPE_CHECKING:
    import torch

    from peftcli.recipe import ModelSection


def source(section: ModelSection) -> str:
    """Where weights come from: a folder path or a hub id."""
    path = builtin.resolve(section.name_or_path)
    looks_local = path.startswith((".", "/", "~")) or Path(path).exists()
    if looks_local and not Path(path).expanduser().is_dir():
        raise UserError(f"model.name_or_path: no such folder: {path}")
    return str(Path(path).expanduser()) if looks_local else path


def _common_kwargs(section: ModelSection) -> dict[str, Any]:
    if section.trust_remote_code:
        _warn_remote_code(section.name_or_path, section.revision)
    return {"revision": section.revision, "trust_remote_code": section.trust_remote_code}


@functools.cache
def _warn_remote_code(name: str, revision: str | None) -> None:
    pin = (
        f"pinned to revision {revision}"
        if revision
        else "not pinned: set model.revision to a commit you have reviewed"
    )
    print(
        f"peftcli: warning: model.trust_remote_code is true: code from {name} will run ({pin})",
        file=sys.stderr,
        flush=True,
    )


def _load_error(what: str, path: str, exc: Exception) -> UserError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "trust_remote_code" in str(exc) or "contains custom code" in str(exc):
        hint = (
            "only if you trust that code: pass --trust-remote-code (eval, generate, merge), or set "
            "model.trust_remote_code: true in your own recipe (train)"
        )
    else:
        hint = "check the path or hub id; offline, only local folders and builtin:<name> load"
    return UserError(f"model.name_or_path: cannot load the {what} of `{path}`: {first}", hint)


def load_config(section: ModelSection, labels: list[str] | None = None) -> Any:
    """The model config; for classification with the class names the data defines."""
    from transformers import AutoConfig

    path = source(section)
    try:
        config = AutoConfig.from_pretrained(path, **_common_kwargs(section))
    except (OSError, ValueError, KeyError) as exc:
        raise _load_error("config", path, exc) from None
    check_vision(section, config)
    if section.task == "seq_cls":
        if labels is not None and section.num_labels not in (None, len(labels)):
            raise UserError(
                f"model.num_labels: {section.num_labels}, but the training data has {len(labels)} "
                f"labels ({', '.join(labels)})",
                "remove model.num_labels to take it from the data",
            )
        names = labels or [str(i) for i in range(section.num_labels or config.num_labels)]
        config.num_labels = len(names)
        config.id2label = dict(enumerate(names))
        config.label2id = {n: i for i, n in enumerate(names)}
    return config


def check_vision(section: ModelSection, config: Any) -> None:
    """A vision-language model (a config with a vision part) is trained as image_text_to_text, and only
    such a model is: never loaded as a text-only causal LM by mistake."""
    vision = getattr(config, "vision_config", None) is not None
    if vision and not TASKS[section.task].vision:
        raise UserError(
            f"model.task: {section.task}, but `{section.name_or_path}` is a vision-language model "
            f"({config.model_type})",
            "set model.task: image_text_to_text",
        )
    if TASKS[section.task].vision and not vision:
        raise UserError(
            f"model.task: {section.task} needs a vision-language model; `{section.name_or_path}` "
            f"({config.model_type}) has no vision part",
            "use causal_lm",
        )


def load_tokenizer(section: ModelSection) -> Any:
    """The tokenizer; for image_text_to_text, the processor's, with the processor itself as its
    `processor` attribute (it reads the images, and is saved with the adapter)."""
    from transformers import AutoProcessor, AutoTokenizer

    path = source(section)
    try:
        if TASKS[section.task].vision:
            processor = AutoProcessor.from_pretrained(path, **_common_kwargs(section))
            tokenizer = processor.tokenizer
            tokenizer.processor = processor
        else:
            tokenizer = AutoTokenizer.from_pretrained(path, **_common_kwargs(section))
    except (OSError, ValueError, KeyError) as exc:
        raise _load_error("tokenizer", path, exc) from None
    except ImportError as exc:  # a processor part that needs a missing library (Qwen2-VL's: torchvision)
        first = str(exc).strip().split(" but ")[0].split(". ")[0]
        raise UserError(
            f"model.name_or_path: cannot load the processor of `{path}`: {first}, which is not installed",
            "install it, or use a model whose processor does without it",
        ) from None
    if tokenizer.pad_token is None:
        # Padding positions are masked by attention and labels, so any id works; EOS labels
        # are built from positions, never by comparing with pad_token_id.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def resolve_dtype(section: ModelSection) -> torch.dtype:
    import torch

    if section.dtype == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, section.dtype)


def meta_model(section: ModelSection, config: Any, dtype: Any) -> Any:
    """The model's module tree on the meta device, from its config: no weights read (estimates)."""
    import torch
    import transformers

    cls = getattr(transformers, TASKS[section.task].auto_class)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": section.trust_remote_code}
    if section.attn_implementation:
        kwargs["attn_implementation"] = section.attn_implementation
    try:
        with torch.device("meta"):
            return cls.from_config(config, **kwargs)
    except ValueError as exc:
        raise UserError(
            f"model.task: {section.task} does not fit `{section.name_or_path}` "
            f"({type(config).__name__}): {str(exc).splitlines()[0]}"
        ) from None


def load_model(section: ModelSection, device: Any = None, labels: list[str] | None = None) -> Any:
    """Load the weights for the recipe's task, dtype and quantization.

    Quantized bases are placed on `device` at load time (bitsandbytes quantizes while it
    loads) and prepared for k-bit training; unquantized models stay on CPU until Accelerate
    moves them.
    """
    import torch
    import transformers

    path = source(section)
    config = load_config(section, labels)
    cls = getattr(transformers, TASKS[section.task].auto_class)
    dtype = resolve_dtype(section)
    quant = quantization_config(section, dtype)
    kwargs: dict[str, Any] = {"config": config, "dtype": dtype, **_common_kwargs(section)}
    if section.attn_implementation:
        kwargs["attn_implementation"] = section.attn_implementation
    if dtype == torch.float64:  # fused MoE experts' default grouped_mm kernel has no float64
        kwargs["experts_implementation"] = "eager"
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {
            "": device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        }
    from safetensors import SafetensorError

    try:
        model = cls.from_pretrained(path, **kwargs)
    except (OSError, ValueError, SafetensorError) as exc:  # a missing or corrupt weights file
        raise _load_error("weights", path, exc) from None
    if quant is not None:
        model = prepare_quantized(model)
        if TASKS[section.task].vision and is_main_process():
            say(
                f"peftcli: note: model.quantization: {section.quantization} quantizes the language model; "
                f"the vision tower and projector stay in {dtype}".replace("torch.", "")
            )
    if getattr(model.config, "pad_token_id", None) is None and section.task == "seq_cls":
        model.config.pad_token_id = model.config.eos_token_id
    return model
