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

from peftcli.errors import UserError, did_you_mean
from peftcli.home import home, make_dirs
from peftcli.model.builtin_vlm import tiny_idefics3, tiny_llava
from peftcli.outputs import follow_umask

# Llama 3's pre-tokenizer split rule: the builtin BPE tokenizer's, and a name GGUF readers know.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

PREFIX = "builtin:"
VERSION = 2  # bump when a builtin model changes: caches keep the old ones apart

# ChatML, as Qwen and many instruction-tuned models use it: every turn ends with <|im_end|>.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


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
    specials: list[str],
    roles: dict[str, str],
    wrap: tuple[str | None, str | None] = (None, None),
    chat_template: str | None = None,
) -> Any:
    """A byte-level BPE tokenizer (GPT-2 family) over the 256 bytes, plus special tokens.

    It has no merges, so every byte is one token: real, lossless on any text, and with no
    training step that could differ between machines. `roles` names the special tokens
    (bos_token, eos_token, pad_token, cls_token, ...); `wrap` is what encoding puts before and
    after a text (BOS for Llama, </s> after for T5, [CLS] ... [SEP] for BERT).
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
    before, after = wrap
    if before or after:
        single = " ".join(t for t in (before, "$A", after) if t)
        pair = " ".join(t for t in (before, "$A", after, "$B", after) if t)
        used = sorted({t for t in wrap if t})
        tokenizer.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=[(t, vocab[t]) for t in used]
        )
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    extra = [t for t in specials if t not in roles.values()]
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        additional_special_tokens=extra,
        chat_template=chat_template,
        model_max_length=1024,
        **roles,
    )


def trained_bpe_tokenizer(
    specials: list[str], roles: dict[str, str], wrap: str, chat_template: str, vocab_size: int
) -> Any:
    """A byte-level BPE tokenizer with real merges, as Llama 3's: its split rule, the 256 bytes,
    then merges learned by `tokenizers`' BpeTrainer from tiny_bpe_corpus.txt (shipped with
    peftcli: sentences and prompts from the example data, frozen so that the vocabulary never
    changes), up to `vocab_size` tokens. The trainer is deterministic: counts, then the pair's
    ids, break its ties. The specials take the first ids, `wrap` goes before every text."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    corpus = (Path(__file__).with_name("tiny_bpe_corpus.txt")).read_text(encoding="utf-8")
    tokenizer.train_from_iterator(corpus.splitlines(), trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{wrap} $A", pair=f"{wrap} $A {wrap} $B", special_tokens=[(wrap, tokenizer.token_to_id(wrap))]
    )
    extra = [t for t in specials if t not in roles.values()]
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        additional_special_tokens=extra,
        chat_template=chat_template,
        model_max_length=1024,
        **roles,
    )


# Weights are drawn with std = 1/sqrt(width) rather than the usual 0.02: with tied embeddings a
# frozen random model then has logits large enough for an adapter to make sharp predictions.


def _chatml_byte_tokenizer() -> Any:
    """tiny-llama's tokenizer (tiny-mixtral's too): byte-level, ChatML specials and template."""
    return byte_level_tokenizer(
        ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"],
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"},
        wrap=("<s>", None),
        chat_template=CHATML_TEMPLATE,
    )


def _stop_at_turn_end(model: Any, tok: Any) -> None:
    """Generation stops at the end of an assistant turn as well as at </s>."""
    model.generation_config.eos_token_id = [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]


def tiny_llama_config(tok: Any, **changes: Any) -> Any:
    """tiny-llama's shape (tiny-llava's language model and tiny-llama-bpe too, with `changes`),
    for the tokenizer `tok`."""
    from transformers import LlamaConfig

    ids = {f"{t}_token_id": getattr(tok, f"{t}_token_id") for t in ("bos", "eos", "pad")}
    shape = {"hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 4, "num_attention_heads": 4}
    more = {"num_key_value_heads": 2, "max_position_embeddings": 1024, "initializer_range": 128**-0.5}
    return LlamaConfig(vocab_size=len(tok), tie_word_embeddings=True, **{**shape, **more, **ids, **changes})


def _tiny_llama() -> tuple[Any, Any]:
    from transformers import LlamaForCausalLM

    tok = _chatml_byte_tokenizer()
    model = LlamaForCausalLM(tiny_llama_config(tok))
    _stop_at_turn_end(model, tok)
    return model, tok


def _tiny_mixtral() -> tuple[Any, Any]:
    from transformers import MixtralConfig, MixtralForCausalLM

    # tiny-llama's tokenizer; 4 experts, 2 per token. transformers 5 holds each block's
    # experts as two fused 3-D parameters (gate_up_proj, down_proj) and its router as a plain
    # weight: none of them is an nn.Linear, so `all-linear` alone leaves them out.
    tok = _chatml_byte_tokenizer()
    config = MixtralConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        initializer_range=64**-0.5,
        router_jitter_noise=0.0,
    )
    model = MixtralForCausalLM(config)
    _stop_at_turn_end(model, tok)
    return model, tok


def _tiny_llama_bpe() -> tuple[Any, Any]:
    """tiny-llama's kind with a trained BPE vocabulary (its GGUF file has merges, which llama.cpp
    needs) and 64-wide heads (a head size vLLM's attention kernels support)."""
    from transformers import LlamaForCausalLM

    tok = trained_bpe_tokenizer(
        ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"],
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"},
        wrap="<s>",
        chat_template=CHATML_TEMPLATE,
        vocab_size=512,
    )
    model = LlamaForCausalLM(
        tiny_llama_config(tok, num_attention_heads=2, num_key_value_heads=1, head_dim=64)
    )
    _stop_at_turn_end(model, tok)
    return model, tok


def _tiny_gpt2() -> tuple[Any, Any]:
    from transformers import GPT2Config, GPT2LMHeadModel

    # Like the real GPT-2: one special token for bos/eos/unk and no pad token at all.
    tok = byte_level_tokenizer(
        ["<|endoftext|>"],
        {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"},
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
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config), tok


def _tiny_t5() -> tuple[Any, Any]:
    from transformers import T5Config, T5ForConditionalGeneration

    # Like T5: the tokenizer appends </s>, pad (id of <pad>) starts the decoder.
    tok = byte_level_tokenizer(
        ["<pad>", "</s>", "<unk>"],
        {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"},
        wrap=(None, "</s>"),
    )
    config = T5Config(
        vocab_size=len(tok),
        d_model=64,
        d_kv=16,
        d_ff=160,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=16,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.pad_token_id,
        initializer_factor=1.0,
        dropout_rate=0.0,
    )
    return T5ForConditionalGeneration(config), tok


def _tiny_bert() -> tuple[Any, Any]:
    from transformers import BertConfig, BertModel

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    roles = dict(
        zip(("pad_token", "unk_token", "cls_token", "sep_token", "mask_token"), specials, strict=True)
    )
    tok = byte_level_tokenizer(specials, roles, wrap=("[CLS]", "[SEP]"))
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=512,
        pad_token_id=tok.pad_token_id,
        initializer_range=64**-0.5,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    # An encoder without a head: `seq_cls` adds a fresh classifier that the adapter trains.
    return BertModel(config, add_pooling_layer=True), tok


@dataclass(frozen=True)
class Builtin:
    name: str
    summary: str
    build: Callable[[], tuple[Any, Any]]


BUILTINS: dict[str, Builtin] = {
    b.name: b
    for b in [
        Builtin("tiny-llama", "Llama (RoPE, GQA, SwiGLU), 4 layers, d=128, ChatML template", _tiny_llama),
        Builtin(
            "tiny-llama-bpe",
            "tiny-llama with a trained 512-token BPE vocabulary and 64-wide heads (llama.cpp, vLLM)",
            _tiny_llama_bpe,
        ),
        Builtin("tiny-gpt2", "GPT-2 (Conv1D, learned positions), 2 layers, d=64, no pad token", _tiny_gpt2),
        Builtin(
            "tiny-t5", "T5 v1.1 encoder-decoder (gated GELU, relative positions), 2+2 layers, d=64", _tiny_t5
        ),
        Builtin("tiny-bert", "BERT encoder for classification, 2 layers, d=64", _tiny_bert),
        Builtin(
            "tiny-mixtral", "Mixtral MoE: 4 fused experts (top-2) per layer, 2 layers, d=64", _tiny_mixtral
        ),
        Builtin(
            "tiny-llava",
            "LLaVA vision-language: CLIP tower (32x32 images, 16 tokens each), tiny-llama's text, ChatML",
            lambda: tiny_llava(byte_level_tokenizer, tiny_llama_config),
        ),
        Builtin(
            "tiny-idefics3",
            "Idefics3 vision-language: 32x32 tiles by the image's shape (4 tokens each), tiny-llama's text",
            lambda: tiny_idefics3(byte_level_tokenizer, tiny_llama_config),
        ),
    ]
}


def builtin_path(name: str) -> Path:
    return home() / "builtin" / f"{name}-v{VERSION}"


def resolve(name_or_path: str, key: str = "model.name_or_path") -> str:
    """Hub ids and folders pass through; `builtin:<name>` becomes its (materialised) folder.
    `key` is what an error names: the recipe key, or '' for a command-line argument."""
    if not name_or_path.startswith(PREFIX):
        return name_or_path
    name = name_or_path[len(PREFIX) :]
    if name not in BUILTINS:
        raise UserError(
            f"{key}{': ' if key else ''}unknown builtin model `{name}`{did_you_mean(name, BUILTINS)}; "
            f"builtins: {', '.join(PREFIX + n for n in BUILTINS)}"
        )
    return str(materialise(name))


def materialise(name: str) -> Path:
    target = builtin_path(name)
    if (target / "config.json").is_file():
        return target
    import torch

    from peftcli.console import quiet_libraries

    quiet_libraries()
    make_dirs(target.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model, tok = BUILTINS[name].build()
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "peftcli_builtin.json").write_text(json.dumps({"name": name, "version": VERSION}))
        follow_umask(tmp)  # mkdtemp makes it 0700 and safetensors writes 0600: a shared cache
        try:
            os.rename(tmp, target)  # atomic: concurrent processes race safely
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
