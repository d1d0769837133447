"""The builtin vision-language model: transformers' own LLaVA (a CLIP vision tower, a two-layer
projector, a Llama language model) at random init, with its real processor (CLIP's image
processor, the slow PIL one, and a byte-level tokenizer with an `<image>` token), built offline.

Small enough that a 2-core CPU trains hundreds of steps in minutes: 32x32 images in 8x8 patches
give 16 image tokens per image (LLaVA's default strategy drops the vision tower's CLS token).
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

    tok = byte_level_tokenizer(
        ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>", IMAGE_TOKEN],
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"},
        wrap=("<s>", None),
        chat_template=VLM_CHATML_TEMPLATE,
    )
    image_token_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    vision = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=64,
        initializer_range=64**-0.5,
    )
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
