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
    assert model.config.get_text_config().vocab_size == len(tok)


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


def test_tiny_llava_loads_with_its_processor_through_the_image_text_classes():
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from peftcli.model.builtin_vlm import IMAGE_SIZE, PATCH_SIZE

    path = builtin.materialise("tiny-llava")
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\n<image>Colour?<|im_end|>\n<|im_start|>assistant\n"
    inputs = processor(text=text, images=[Image.new("RGB", (50, 40), (255, 0, 0))], return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    # One token per patch; the CLS token is dropped by LLaVA's default feature strategy.
    image_tokens = (inputs["input_ids"] == model.config.image_token_id).sum().item()
    assert image_tokens == (IMAGE_SIZE // PATCH_SIZE) ** 2
    assert model(**inputs).logits.shape[1] == inputs["input_ids"].shape[1]


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
