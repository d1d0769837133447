"""Regenerate data/quickstart/: a string transformation a random base cannot do.

Each example asks for a made-up lowercase word in capitals. Held-out words never occur in
training, so exact match on eval measures a learned rule, not memorisation.

    python scripts/make_quickstart_data.py
"""

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "data" / "quickstart"


def words(rng: random.Random, n: int, taken: set[str]) -> list[str]:
    out = []
    while len(out) < n:
        w = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8)))
        if w not in taken:
            taken.add(w)
            out.append(w)
    return out


def main() -> None:
    rng = random.Random(1234)
    taken: set[str] = set()
    splits = {"train": words(rng, 3000, taken), "eval": words(rng, 64, taken)}
    OUT.mkdir(parents=True, exist_ok=True)
    for split, ws in splits.items():
        with (OUT / f"{split}.jsonl").open("w") as f:
            for w in ws:
                f.write(json.dumps({"prompt": f"Uppercase: {w}\n", "completion": w.upper()}) + "\n")


if __name__ == "__main__":
    main()
