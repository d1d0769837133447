"""Builtin models: deterministic ordinary HF folders with a real tokenizer, loaded like any other."""

from __future__ import annotations

import hashlib

import pytest

from peftcli.errors import UserError
from peftcli.model import builtin


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", sorted(builtin.BUILTINS))
def test_builtin_is_a_deterministic_hf_folder(name, tmp_path, monkeypatch):
    from transformers import AutoModel, AutoTokenizer

    first = builtin.materialise(name)
    monkeypatch.setenv("PEFTCLI_HOME", str(tmp_path))
    second = builtin.materialise(name)
    assert first != second
    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        assert digest(first / f) == digest(second / f), f"{f} differs between two materialisations"
    model = AutoModel.from_pretrained(second)
    tok = AutoTokenizer.from_pretrained(second)
    text = "Grüße, world! 123"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text  # byte-level: lossless on any text
    assert model.config.vocab_size == len(tok)


def test_tiny_llama_has_a_chat_template_and_stops_at_end_of_turn():
    from transformers import AutoTokenizer, GenerationConfig

    path = builtin.materialise("tiny-llama")
    tok = AutoTokenizer.from_pretrained(path)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    eos = GenerationConfig.from_pretrained(path).eos_token_id
    assert tok.convert_tokens_to_ids("<|im_end|>") in eos and tok.eos_token_id in eos


def test_tiny_gpt2_has_no_pad_token_like_the_real_one():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(builtin.materialise("tiny-gpt2"))
    assert tok.pad_token is None and tok.eos_token == "<|endoftext|>"


def test_builtin_names_resolve_to_folders_and_others_pass_through():
    assert builtin.resolve("builtin:tiny-llama").endswith(f"tiny-llama-v{builtin.VERSION}")
    assert builtin.resolve("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    with pytest.raises(UserError, match="did you mean `tiny-llama`"):
        builtin.resolve("builtin:tiny-lama")


def test_peftcli_home_defaults_to_the_user_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("PEFTCLI_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert builtin.home() == tmp_path / "peftcli"
