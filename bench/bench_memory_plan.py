"""`peftcli estimate`'s memory plan against the peak resident memory a real training step adds.

    make bench-memory                      # both sizes, without and with gradient checkpointing
    python bench/bench_memory_plan.py --sizes small

A benchmark figure, not a test: the peak RSS holds, beside the tensors the plan counts,
allocator slack and kernel workspaces that differ with the CPU (an AMX Xeon and an AVX-512 BF16
EPYC page in different kernels) and the allocator. tests/test_estimate.py checks the plan
against the tensors themselves, counted exactly.

Each case trains one step through `peftcli.training.run.train` in a fresh process and reports
VmRSS when `fit` starts (model, adapter and data loaded, weights paged in) and the peak (VmHWM,
reset through /proc/self/clear_refs at that moment) when it returns, less the file-backed pages
(library code) the first backward pass and optimizer step page in. glibc's mmap threshold is
fixed at 128 KiB so that freed tensors leave RSS (its dynamic threshold keeps up to 32 MiB of
freed blocks in its arenas). Results: bench/results/memory-plan.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# (hidden, intermediate, layers, vocabulary, batch, max_length)
SIZES = {
    "small": (256, 704, 4, 8000, 4, 128),  # 4.9 M parameters, 512 tokens
    "llama-512": (512, 1408, 8, 32000, 8, 256),  # 58.5 M parameters, 2048 tokens
}

MEASURE = """
import json, re, sys
import peftcli.training.loop
from peftcli.recipe_file import load_recipe
from peftcli.training.run import train

def status(key):
    return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read())[1]) * 1024

real_fit, seen = peftcli.training.loop.fit, {}
def fit(model, *args, **kwargs):
    for p in model.parameters():  # page the mmapped weights in: they count before training
        float(p.detach().sum())
    import gc; gc.collect()
    seen["before"] = status("VmRSS")
    seen["file_before"] = status("RssFile")
    open("/proc/self/clear_refs", "w").write("5")
    summary = real_fit(model, *args, **kwargs)
    seen["peak"] = status("VmHWM")
    seen["file_after"] = status("RssFile")
    return summary
peftcli.training.loop.fit = fit
train(load_recipe(sys.argv[1], sys.argv[2:]))
print(json.dumps(seen))
"""


def make_model(size: str, folder: Path) -> Path:
    """A random-init Llama of that size (tiny-llama's tokenizer) and 16 rows of long text."""
    import torch
    import yaml
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from peftcli.model.builtin import materialise

    hidden, intermediate, layers, vocab, batch, length = SIZES[size]
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=vocab,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder / "model")
    AutoTokenizer.from_pretrained(materialise("tiny-llama")).save_pretrained(folder / "model")
    letters = "abcdefghijklmnopqrstuvwxyz     "
    rows = ["".join(letters[(i * 7 + j * j) % len(letters)] for j in range(length + 100)) for i in range(16)]
    (folder / "long.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    recipe = {
        "name": size,
        "model": {"name_or_path": str(folder / "model")},
        "peft": {"method": "lora", "target_modules": "all-linear", "r": 8, "dropout": 0.0},
        "data": {"train": "long.jsonl", "eval": 0, "max_length": length, "train_on": "all", "format": "text"},
        "training": {"max_steps": 1, "batch_size": batch},
    }
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return folder / "recipe.yaml"


def measure(recipe: Path, overrides: list[str]) -> int:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "MALLOC_MMAP_THRESHOLD_": "131072"}
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE, str(recipe), *overrides], capture_output=True, text=True, env=env
    )
    if proc.returncode != 0:
        sys.exit(proc.stderr[-3000:])
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    return seen["peak"] - seen["before"] - (seen["file_after"] - seen["file_before"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "memory-plan.json")
    args = parser.parse_args()
    if not Path("/proc/self/clear_refs").exists():
        sys.exit("bench_memory_plan needs Linux /proc to read the peak RSS")
    from peftcli.commands.estimate import estimate
    from peftcli.recipe_file import load_recipe

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            recipe = make_model(size, Path(tmp) / size)
            for checkpointing in ("false", "true"):
                overrides = [
                    f"training.gradient_checkpointing={checkpointing}",
                    f"training.output_dir={Path(tmp) / size / ('run-' + checkpointing)}",
                ]
                plan = estimate(load_recipe(recipe, overrides))["memory"]
                predicted = plan["optimizer_bytes"] + plan["gradients_bytes"] + plan["activations_bytes"]
                measured = measure(recipe, overrides)
                row = {
                    "size": size,
                    "gradient_checkpointing": checkpointing == "true",
                    "predicted_mib": round(predicted / 2**20, 1),
                    "measured_mib": round(measured / 2**20, 1),
                    "ratio": round(predicted / measured, 3),
                }
                results.append(row)
                print(
                    f"{size:>10}  checkpointing={checkpointing:<5}  plan {row['predicted_mib']:>7} MiB  "
                    f"peak RSS added {row['measured_mib']:>7} MiB  plan/measured {row['ratio']:.2f}",
                    flush=True,
                )
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line), "?")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"cpu": cpu, "machine": platform.machine(), "results": results}, indent=2) + "\n"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
