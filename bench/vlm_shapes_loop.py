"""A plain transformers + PEFT loop on a tiny random LLaVA and data/vlm/shapes/: what it takes
for a LoRA on the language model to learn to see (steps, lr, rank, projector, image tokens).

Not peftcli: an experiment to size the demo recipe while the pipeline is built.

    python bench/vlm_shapes_loop.py --patch 8 --steps 300 --lr 2e-3 --r 16 [--train-projector]

Exact match is measured teacher-forced: greedy decoding reproduces the answer and its <|im_end|>
exactly when the argmax at every answer position is the answer's next token.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))  # after PYTHONPATH: --builtin takes peftcli from there
DATA = ROOT / "data" / "vlm" / "shapes"

# ChatML; a content given as a list of parts renders each image part as one <image> placeholder.
from peftcli.model.builtin_vlm import VLM_CHATML_TEMPLATE as TEMPLATE  # noqa: E402


def load_builtin():
    """tiny-llava as peftcli builds it (run with PYTHONPATH at a checkout that has it)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from peftcli.model.builtin import materialise

    folder = materialise("tiny-llava")
    processor = AutoProcessor.from_pretrained(folder)
    return AutoModelForImageTextToText.from_pretrained(folder), processor, processor.tokenizer


def build(args):
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.llava.processing_llava import LlavaProcessor

    from peftcli.model.builtin import byte_level_tokenizer, tiny_llama_config

    tok = byte_level_tokenizer(
        ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>", "<image>"],
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"},
        wrap=("<s>", None),
        chat_template=TEMPLATE,
    )
    size = args.image
    image_processor = CLIPImageProcessorPil(
        size={"height": size, "width": size}, crop_size={"height": size, "width": size}, do_center_crop=False
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=args.patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=TEMPLATE,
    )
    vision = CLIPVisionConfig(
        image_size=size,
        patch_size=args.patch,
        hidden_size=args.vision_width,
        intermediate_size=args.vision_width * 4,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=args.vision_width,
    )
    text = tiny_llama_config(tok)
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=args.feature_layer,
        vision_feature_select_strategy="default",
        image_seq_length=(size // args.patch) ** 2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    return model, processor, tok


def encode(rows, processor, tok):
    """input_ids, labels (answer + <|im_end|> only), pixel_values; prompts padded on the right."""
    end = tok.convert_tokens_to_ids("<|im_end|>")
    images, ids, labels = [], [], []
    for r in rows:
        msgs = r["messages"]
        user = msgs[:1]
        answer = msgs[1]["content"][0]["text"]
        prompt = processor.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
        img = Image.open(DATA / user[0]["content"][0]["image"]).convert("RGB")
        p = processor(images=img, text=prompt, return_tensors="pt")
        a = tok(answer, add_special_tokens=False)["input_ids"] + [end]
        pid = p["input_ids"][0].tolist()
        ids.append(pid + a)
        labels.append([-100] * len(pid) + a)
        images.append(p["pixel_values"][0])
    width = max(map(len, ids))
    pad = tok.pad_token_id
    input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids])
    lab = torch.tensor([x + [-100] * (width - len(x)) for x in labels])
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
    return input_ids, lab, mask, torch.stack(images)


def exact_match(model, batch, rows, bs=64):
    input_ids, labels, mask, pixels = batch
    hits = {"colour": [], "shape": []}
    model.eval()
    with torch.no_grad():
        for i in range(0, len(input_ids), bs):
            out = model(
                input_ids=input_ids[i : i + bs],
                attention_mask=mask[i : i + bs],
                pixel_values=pixels[i : i + bs],
            )
            pred = out.logits[:, :-1].argmax(-1)
            tgt = labels[i : i + bs, 1:]
            ok = ((pred == tgt) | (tgt == -100)).all(-1)
            for j, hit in enumerate(ok.tolist()):
                q = rows[i + j]["messages"][0]["content"][1]["text"]
                hits["colour" if "colour" in q else "shape"].append(hit)
    model.train()
    allh = hits["colour"] + hits["shape"]
    return sum(allh) / len(allh), {k: round(sum(v) / len(v), 3) for k, v in hits.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--builtin", action="store_true", help="peftcli's builtin:tiny-llava, not build()")
    ap.add_argument("--image", type=int, default=32)
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--vision-width", type=int, default=64)
    ap.add_argument("--feature-layer", type=int, default=-2)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--bs", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--train-projector", action="store_true")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from peft import LoraConfig, get_peft_model

    model, processor, tok = load_builtin() if args.builtin else build(args)
    train_rows = [json.loads(x) for x in (DATA / "train.jsonl").read_text().splitlines()]
    eval_rows = [json.loads(x) for x in (DATA / "eval.jsonl").read_text().splitlines()]
    train, ev = encode(train_rows, processor, tok), encode(eval_rows, processor, tok)
    n_img = int((train[0][0] == tok.convert_tokens_to_ids("<image>")).sum())
    print(f"image tokens per image: {n_img}; train rows {len(train_rows)}; seq len {train[0].shape[1]}")
    lcfg = LoraConfig(
        r=args.r,
        lora_alpha=2 * args.r,
        lora_dropout=0.0,
        target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
        modules_to_save=["multi_modal_projector"] if args.train_projector else None,
    )
    model = get_peft_model(model, lcfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"trainable {trainable}")
    em0 = exact_match(model, ev, eval_rows)
    print(f"step 0 eval EM {em0}")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / (0.05 * args.steps)) * 0.5 * (1 + math.cos(math.pi * s / args.steps)),
    )
    g = torch.Generator().manual_seed(42)
    n = len(train_rows)
    perm = torch.randperm(n, generator=g)
    pos = 0
    t0 = time.time()
    for step in range(1, args.steps + 1):
        if pos + args.bs > n:
            perm, pos = torch.randperm(n, generator=g), 0
        idx = perm[pos : pos + args.bs]
        pos += args.bs
        ids, lab, mask, pix = (t[idx] for t in train)
        loss = model(input_ids=ids, attention_mask=mask, pixel_values=pix, labels=lab).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % 10 == 0:
            print(f"step {step} loss {loss.item():.4f} t {time.time() - t0:.0f}s", flush=True)
        if step % args.eval_every == 0 or step == args.steps:
            seen = exact_match(model, tuple(t[:128] for t in train), train_rows[:128])[0]
            print(
                f"step {step} eval EM {exact_match(model, ev, eval_rows)} train EM {seen:.3f} t {time.time() - t0:.0f}s",
                flush=True,
            )
    print(f"train wall {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
