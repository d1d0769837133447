"""The builtin vision-language models, at random init, with their real processors (the slow PIL
image processors, a byte-level tokenizer with the model's image tokens), built offline:

- tiny-llava: transformers' own LLaVA (a CLIP vision tower, a two-layer projector, a Llama
  language model). 32x32 images in 8x8 patches give 16 image tokens per image, whatever the
  image's size (LLaVA's default strategy drops the vision tower's CLS token).
- tiny-idefics3: transformers' own Idefics3 (a SigLIP-style tower, a pixel-shuffle connector, a
  Llama language model), whose token count depends on the image's shape: the image is scaled to
  a longest side of 64, cut into 32x32 tiles (rows x columns by its aspect ratio) plus the whole
  image as one more tile, and each tile gives 4 tokens (8x8 patches, pixel shuffle by 2). A
  square image gives 2x2 tiles + 1 = 20 tokens, a 4:1 one 1x2 + 1 = 12.

Qwen2-VL (the size-dependent family most fine-tuned) is not among them: with transformers 5.25
its processor cannot be built or loaded without torchvision (it holds a video processor,
which is a torchvision class), and torchvision does not load beside this torch.

Small enough that a 2-core CPU trains hundreds of steps in minutes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

IMAGE_TOKEN = "<image>"
IMAGE_SIZE = 32
PATCH_SIZE = 8

# ChatML, with a message's content either a string or a list of parts as Hugging Face chat data
# has them: {"type": "image"} stands for one image (the processor expands it to its tokens),
# {"type": "text", "text": ...} for text.
VLM_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# Both vision towers: 32x32 images in 8x8 patches, two small layers.
VISION = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": IMAGE_SIZE,
    "patch_size": PATCH_SIZE,
    "initializer_range": 64**-0.5,
}


def _tokenizer(byte_level_tokenizer: Callable[..., Any], *extra: str) -> Any:
    """builtin.py's byte-level tokenizer with the chat markers, the image token, `extra` tokens
    and the image chat template; it puts `<s>` first, as LLaVA's Llama tokenizer does."""
    return byte_level_tokenizer(
        ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>", IMAGE_TOKEN, *extra],
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"},
        wrap=("<s>", None),
        chat_template=VLM_CHATML_TEMPLATE,
    )


def tiny_llava(
    byte_level_tokenizer: Callable[..., Any], text_config: Callable[[Any], Any]
) -> tuple[Any, Any]:
    """The model and its processor (saved like a tokenizer: `save_pretrained` writes both); the
    language model is tiny-llama's shape (`text_config`)."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tok = _tokenizer(byte_level_tokenizer)
    image_token_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    vision = CLIPVisionConfig(**VISION, projection_dim=64)
    text = text_config(tok)
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,  # the last layer: every vision parameter reaches the output
        tie_word_embeddings=True,
    )
    model = LlavaForConditionalGeneration(config)
    model.generation_config.eos_token_id = [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]
    model.generation_config.pad_token_id = tok.pad_token_id
    images = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_convert_rgb=True,
    )
    processor = LlavaProcessor(
        image_processor=images,
        tokenizer=tok,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, which the "default" strategy drops
        chat_template=VLM_CHATML_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )
    return model, processor


# Idefics3's tokens beyond <image>: the marks around each tile, the whole image's tag, each
# tile's row and column (the processor knows up to 6x6), and Idefics3's end of turn.
IDEFICS3_TOKENS = [
    "<fake_token_around_image>",
    "<global-img>",
    *(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)),
    "<end_of_utterance>",
]


def tiny_idefics3(
    byte_level_tokenizer: Callable[..., Any], text_config: Callable[[Any], Any]
) -> tuple[Any, Any]:
    """Idefics3 with tiny-llama's language model and tiny-llava's ChatML template; the count of
    image tokens depends on the image's shape (see the module doc)."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    tok = _tokenizer(byte_level_tokenizer, *IDEFICS3_TOKENS)
    vision = Idefics3VisionConfig(**VISION)
    config = Idefics3Config(
        vision_config=vision,
        text_config=text_config(tok),
        image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        scale_factor=2,
        tie_word_embeddings=True,
    )
    model = Idefics3ForConditionalGeneration(config)
    model.generation_config.eos_token_id = [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]
    model.generation_config.pad_token_id = tok.pad_token_id
    images = Idefics3ImageProcessorPil(
        size={"longest_edge": 2 * IMAGE_SIZE},
        max_image_size={"longest_edge": IMAGE_SIZE},
        do_image_splitting=True,
    )
    per_tile = (IMAGE_SIZE // PATCH_SIZE) ** 2 // 2**2  # patches, merged 2x2 by the pixel shuffle
    processor = Idefics3Processor(
        image_processor=images, tokenizer=tok, image_seq_len=per_tile, chat_template=VLM_CHATML_TEMPLATE
    )
    return model, processor
