"""Builtin tiny models: random-init, deterministic, with a real tokenizer, written once as
ordinary Hugging Face model folders so the normal `from_pretrained` path loads them offline.

`builtin:<name>` resolves to `$PEFTCLI_HOME/builtin/<name>-v<version>/`; nothing else about a
builtin model is special.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError, did_you_mean

PREFIX = "builtin:"
VERSION = 1

# ChatML, as Qwen and many instruction-tuned models use it: every turn ends with <|im_end|>.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def home() -> Path:
    if os.environ.get("PEFTCLI_HOME"):
        return Path(os.environ["PEFTCLI_HOME"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "peftcli"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable-character map (the byte-level BPE alphabet)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def byte_level_tokenizer(
    specials: list[str], bos: str | None, eos: str, pad: str | None, chat_template: str | None, add_bos: bool
) -> Any:
    """A byte-level BPE tokenizer (GPT-2 family) over the 256 bytes, plus special tokens.

    It has no merges, so every byte is one token: real, lossless on any text, and with no
    training step that could differ between machines.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(_bytes_to_unicode().values())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for tok in specials:
        vocab[tok] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    if add_bos and bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
        )
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    extra = [t for t in specials if t not in {bos, eos, pad}]
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        additional_special_tokens=extra,
        chat_template=chat_template,
        model_max_length=1024,
    )


# Weights are drawn with std = 1/sqrt(width) rather than the usual 0.02: with tied embeddings a
# frozen random model then has logits large enough for an adapter to make sharp predictions.


def _tiny_llama() -> tuple[Any, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = byte_level_tokenizer(
        ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"],
        bos="<s>",
        eos="</s>",
        pad="<pad>",
        chat_template=CHATML_TEMPLATE,
        add_bos=True,
    )
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        initializer_range=128**-0.5,
    )
    model = LlamaForCausalLM(config)
    # Stop at the end of an assistant turn as well as at </s>.
    model.generation_config.eos_token_id = [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]
    return model, tok


def _tiny_gpt2() -> tuple[Any, Any]:
    from transformers import GPT2Config, GPT2LMHeadModel

    # Like the real GPT-2: one special token for bos/eos/unk and no pad token at all.
    tok = byte_level_tokenizer(
        ["<|endoftext|>"],
        bos="<|endoftext|>",
        eos="<|endoftext|>",
        pad=None,
        chat_template=None,
        add_bos=False,
    )
    config = GPT2Config(
        vocab_size=len(tok),
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=1024,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        initializer_range=64**-0.5,
    )
    return GPT2LMHeadModel(config), tok


@dataclass(frozen=True)
class Builtin:
    name: str
    summary: str
    build: Callable[[], tuple[Any, Any]]


BUILTINS: dict[str, Builtin] = {
    b.name: b
    for b in [
        Builtin("tiny-llama", "Llama (RoPE, GQA, SwiGLU), 4 layers, d=128, ChatML template", _tiny_llama),
        Builtin("tiny-gpt2", "GPT-2 (Conv1D, learned positions), 2 layers, d=64, no pad token", _tiny_gpt2),
    ]
}


def builtin_path(name: str) -> Path:
    return home() / "builtin" / f"{name}-v{VERSION}"


def resolve(name_or_path: str) -> str:
    """Hub ids and folders pass through; `builtin:<name>` becomes its (materialised) folder."""
    if not name_or_path.startswith(PREFIX):
        return name_or_path
    name = name_or_path[len(PREFIX) :]
    if name not in BUILTINS:
        raise UserError(
            f"model.name_or_path: unknown builtin model `{name}`{did_you_mean(name, BUILTINS)}; "
            f"builtins: {', '.join(PREFIX + n for n in BUILTINS)}"
        )
    return str(materialise(name))


def materialise(name: str) -> Path:
    target = builtin_path(name)
    if (target / "config.json").is_file():
        return target
    import torch

    from .model import quiet_libraries

    quiet_libraries()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model, tok = BUILTINS[name].build()
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "peftcli_builtin.json").write_text(json.dumps({"name": name, "version": VERSION}))
        try:
            os.rename(tmp, target)  # atomic: concurrent processes race safely
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
