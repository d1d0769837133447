"""The tokenizer a run trained with, as GGUF metadata.

gguf-py's `SpecialVocab` writes what it reads from a tokenizer folder: the BPE merges, the ids of
the special tokens (bos, eos, unk, pad, ...) and the chat template. Written here, because no
library derives them from a transformers tokenizer:

- the token list in id order, with each token's type (special added tokens are CONTROL, other
  added tokens USER_DEFINED, `<0xNN>` byte tokens BYTE) and, for SentencePiece-style
  vocabularies, a score per token (minus the rank of the merge that makes it, so llama.cpp's
  score-driven merging follows the BPE merge order); ids the tokenizer does not use but the
  embedding has are padded with unused `[PADn]` tokens, as llama.cpp's converter does;
- `tokenizer.ggml.pre`, the name under which GGUF readers know a byte-level pre-tokenizer's
  split rule (llama.cpp identifies it by hashing a test text's tokens; here by the rule itself);
- whether encoding adds BOS/EOS, found by encoding one character (not by parsing templates);
- the end-of-turn token: the first of the generation config's EOS ids that is not the EOS.

Two tokenizer kinds are written: byte-level BPE (GPT-2, Llama 3, Qwen: `tokenizer.ggml.model`
= gpt2) and SentencePiece-style BPE with byte fallback (Llama 2, Mistral: = llama). Anything else
(Unigram, WordPiece, an unknown split rule) is refused before any weight is read.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from typing import Any

from peftcli.errors import UserError
from peftcli.model.builtin import LLAMA3_SPLIT

# The split rules GGUF readers know by name (Llama 3's is also the builtin BPE tokenizer's) (llama.cpp's names, as its converter writes them).
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPLITS = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@dataclass
class Vocab:
    model: str  # tokenizer.ggml.model: gpt2 (byte-level BPE) | llama (SentencePiece-style BPE)
    pre: str | None  # tokenizer.ggml.pre (byte-level BPE only)
    spec: dict[str, Any]  # the tokenizers library's JSON description of the tokenizer


def _parts(node: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not node:
        return []
    if node.get("type") == "Sequence":
        return [
            p for child in node.get("pretokenizers") or node.get("normalizers") or [] for p in _parts(child)
        ]
    return [node]


def _split_name(pre_tokenizer: dict[str, Any] | None) -> str | None:
    parts = _parts(pre_tokenizer)
    kinds = [p.get("type") for p in parts]
    if any(p.get("add_prefix_space") for p in parts):
        return None  # GGUF readers never add a space before the text
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        return SPLITS.get((parts[0].get("pattern") or {}).get("Regex"))
    return None


def check_tokenizer(tokenizer: Any, path: Any) -> Vocab:
    """The GGUF tokenizer kind of `tokenizer`; refuses one GGUF readers could not rebuild."""
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"{path}: the tokenizer has no tokenizer.json (a fast tokenizer), which export reads")
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model") or {}
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        return Vocab("llama", None, spec)
    if model.get("type") == "BPE" and (spec.get("decoder") or {}).get("type") == "ByteLevel":
        pre = _split_name(spec.get("pre_tokenizer"))
        if pre is None:
            raise UserError(
                f"{path}: the tokenizer splits text with a rule GGUF readers do not know by name "
                f"({json.dumps(spec.get('pre_tokenizer'))[:120]}); peftcli writes GPT-2's, Llama 3's "
                "and Qwen2's byte-level rules"
            )
        return Vocab("gpt2", pre, spec)
    raise UserError(
        f"{path}: cannot write a {model.get('type')} tokenizer to GGUF; peftcli writes byte-level BPE "
        "(GPT-2, Llama 3, Qwen) and SentencePiece-style BPE with byte fallback (Llama 2, Mistral)"
    )


def _tokens(tokenizer: Any, vocab: Vocab, n_vocab: int) -> tuple[list[str], list[int], list[float]]:
    import gguf

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if max(by_id) >= n_vocab:
        raise UserError(
            f"the tokenizer has ids up to {max(by_id)}, but the model's embedding has {n_vocab} rows"
        )
    added = tokenizer.added_tokens_decoder
    rank = {}
    if vocab.model == "llama":
        for i, merge in enumerate(vocab.spec["model"].get("merges") or []):
            rank.setdefault("".join(merge if isinstance(merge, list) else merge.split(" ")), i)
    tokens, types, scores = [], [], []
    for i in range(n_vocab):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(token)
            if i in added:
                types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
            elif vocab.model == "llama" and token == tokenizer.unk_token:
                types.append(gguf.TokenType.UNKNOWN)
            elif vocab.model == "llama" and BYTE_TOKEN.fullmatch(token):
                types.append(gguf.TokenType.BYTE)
            else:
                types.append(gguf.TokenType.NORMAL)
        scores.append(-float(rank[token]) if token in rank else (0.0 if i not in added else -1000.0))
    return tokens, types, scores


def _adds_prefix_space(spec: dict[str, Any]) -> bool:
    pre = [p for p in _parts(spec.get("pre_tokenizer")) if p.get("type") == "Metaspace"]
    if pre:
        return pre[0].get("prepend_scheme", "always") != "never" and pre[0].get("add_prefix_space", True)
    return any(p.get("type") == "Prepend" for p in _parts(spec.get("normalizer")))


def add_tokenizer(writer: Any, tokenizer: Any, vocab: Vocab, n_vocab: int, eos_ids: list[int]) -> None:
    """Write the tokenizer's metadata into `writer` (a GGUFWriter before its header is written)."""
    import gguf

    tokens, types, scores = _tokens(tokenizer, vocab, n_vocab)
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if vocab.model == "llama":
        writer.add_add_space_prefix(_adds_prefix_space(vocab.spec))
    with tempfile.TemporaryDirectory(prefix="peftcli-vocab-") as folder:
        tokenizer.save_pretrained(folder)
        special = gguf.SpecialVocab(
            folder, load_merges=bool(vocab.spec["model"].get("merges")), n_vocab=n_vocab
        )
    ids = tokenizer("a")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    special.add_special_token = {
        "bos": bos is not None and len(ids) > 1 and ids[0] == bos,
        "eos": eos is not None and len(ids) > 1 and ids[-1] == eos,
    }
    special.add_to_gguf(writer, quiet=True)
    if vocab.model == "llama" or not special.merges:
        # A vocabulary without merges (the builtin tiny models': one token per byte) cannot
        # say so in GGUF: gguf-py refuses an empty array. Without the key, readers derive the
        # merges from the scores (transformers finds none); llama.cpp refuses such a file.
        writer.add_token_scores(scores)
    end_of_turn = next((i for i in eos_ids if i != eos), None)
    if end_of_turn is not None:
        writer.add_eot_token_id(end_of_turn)
