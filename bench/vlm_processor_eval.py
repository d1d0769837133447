"""Held-out exact match of a vision-language run as a user without peftcli measures it: plain
transformers + PEFT, the prompt rendered with the processor's chat template and tokenised by
the processor's plain call (its defaults: the tokenizer's special tokens, BOS, added), greedy.

    python bench/vlm_processor_eval.py runs/vlm-shapes data/vlm/shapes/eval.jsonl [--no-special-tokens]

`--no-special-tokens` passes `add_special_tokens=False` (no BOS). Exact match is peftcli's: the
stripped answer equals the stripped reference.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from peft import PeftModel
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("data", type=Path)
    ap.add_argument("--no-special-tokens", action="store_true")
    ap.add_argument("--max-new-tokens", type=int, default=12)
    args = ap.parse_args()
    adapter = args.run / "adapter"
    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    processor = AutoProcessor.from_pretrained(adapter)
    model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base), adapter).eval()
    rows = [json.loads(line) for line in args.data.read_text().splitlines() if line.strip()]
    extra = {"add_special_tokens": False} if args.no_special_tokens else {}
    hits = {}
    for row in rows:
        user, answer = row["messages"][0], row["messages"][1]["content"][0]["text"]
        files = [args.data.parent / p["image"] for p in user["content"] if p["type"] == "image"]
        text = processor.apply_chat_template([user], add_generation_prompt=True)
        images = [Image.open(f).convert("RGB") for f in files]
        inputs = processor(text=text, images=images, return_tensors="pt", **extra)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        said = processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        question = next(p["text"] for p in user["content"] if p["type"] == "text")
        hits.setdefault(question, []).append(said.strip() == answer.strip())
    every = [h for v in hits.values() for h in v]
    print(
        f"exact match {sum(every) / len(every):.4f} ({sum(every)}/{len(every)})",
        "BOS" if not extra else "no BOS",
    )
    for question, v in hits.items():
        print(f"  {question}: {sum(v)}/{len(v)}")


if __name__ == "__main__":
    main()
