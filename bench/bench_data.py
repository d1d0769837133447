"""Data-preparation benchmark: streaming preparation time, peak memory, and the cached reload.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_data.py [--rows 100000] [--small 20000]

Writes completion-format JSONL files of mixed lengths (20-400 tokens with builtin:tiny-llama's
byte-level tokenizer) into a temporary folder, then prepares each in a fresh subprocess with a
fresh PEFTCLI_HOME (cold cache): `--small` rows, `--rows` rows, and `--rows` rows again (cache
hit). Each child reports the preparation time, its peak RSS and its RSS before preparing
(after importing torch/transformers and loading the tokenizer), and the time from calling
`prepare` to the first collated training batch.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
from functools import partial

def rss_mib():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024

from torch.utils.data import DataLoader
from peftcli.data import collate, prepare
from peftcli.model import load_tokenizer, quiet_libraries
from peftcli.recipe import DataSection, ModelSection

quiet_libraries()
tokenizer = load_tokenizer(ModelSection(name_or_path="builtin:tiny-llama"))
tokenizer("warm up")
before = rss_mib()
start = time.perf_counter()
data = prepare(DataSection(train=sys.argv[1], eval=0.0, max_length=512), tokenizer, seed=0)
prepared = time.perf_counter() - start
loader = DataLoader(data.train.examples, batch_size=8, shuffle=True,
                    collate_fn=partial(collate, pad_id=tokenizer.pad_token_id))
next(iter(loader))
first_batch = time.perf_counter() - start
print(json.dumps({
    "examples": len(data.train.examples),
    "tokens": data.stats["tokens"],
    "from_cache": data.from_cache,
    "prepare_s": round(prepared, 2),
    "first_batch_s": round(first_batch, 2),
    "rss_before_mib": round(before),
    "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
}))
"""

WORDS = "the of and to in is was for on that with as by at from it an be this are or which".split()


def write_data(path: Path, rows: int, seed: int = 0) -> None:
    """Completion rows whose prompt + completion total 20-400 bytes (= tokens here)."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(rows):
            total = rng.randint(20, 400)
            answer = max(4, total // rng.randint(2, 6))
            text = " ".join(rng.choice(WORDS) for _ in range(total // 3))
            prompt = f"Q{i}: " + text[: max(1, total - answer - 8)] + "\nA: "
            f.write(json.dumps({"prompt": prompt, "completion": text[:answer]}) + "\n")


def run_child(data: Path, home: Path) -> dict:
    env = {**os.environ, "PEFTCLI_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(data)], capture_output=True, text=True, env=env, check=False
    )
    if proc.returncode:
        sys.exit(f"child failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--small", type=int, default=20_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        small, large = tmp / f"small-{args.small}.jsonl", tmp / f"large-{args.rows}.jsonl"
        write_data(small, args.small, seed=1)
        write_data(large, args.rows, seed=2)
        subprocess.run(  # materialise the builtin model before anything is timed
            [sys.executable, "-c", "from peftcli.model.builtin import materialise; materialise('tiny-llama')"],
            env={**os.environ, "PEFTCLI_HOME": str(tmp / "home-small")},
            check=True,
        )
        shutil.copytree(tmp / "home-small", tmp / "home-large")
        results = {
            f"{args.small} rows, cold": run_child(small, tmp / "home-small"),
            f"{args.rows} rows, cold": run_child(large, tmp / "home-large"),
            f"{args.rows} rows, cached": run_child(large, tmp / "home-large"),
        }
        sizes = {"small MiB": small.stat().st_size / 2**20, "large MiB": large.stat().st_size / 2**20}
    print(f"data files: {sizes['small MiB']:.1f} MiB and {sizes['large MiB']:.1f} MiB of JSONL")
    print(
        f"{'run':<22} {'examples':>9} {'tokens':>11} {'prepare':>9} {'first batch':>12} "
        f"{'RSS before':>11} {'peak RSS':>9}"
    )
    for name, r in results.items():
        print(
            f"{name:<22} {r['examples']:>9,} {r['tokens']:>11,} {r['prepare_s']:>8.2f}s "
            f"{r['first_batch_s']:>11.2f}s {r['rss_before_mib']:>8} MiB {r['peak_rss_mib']:>5} MiB"
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
