"""Regenerate data/rl/: prompts for online RL (GRPO) with the answer its rewards check.

The task is the quickstart's (a made-up lowercase word, to be written in capitals); each row
holds the prompt and the expected `answer`, which the `exact_match` reward compares with.
Held-out prompts use words that occur nowhere in training.

    python scripts/make_rl_data.py
"""

import json
import random
from pathlib import Path

from make_quickstart_data import words  # the same made-up words (scripts/ is on sys.path)

OUT = Path(__file__).resolve().parent.parent / "data" / "rl"


def main() -> None:
    rng = random.Random(2026)
    taken: set[str] = set()
    OUT.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", 512), ("eval", 32)):
        with (OUT / f"{name}.jsonl").open("w") as f:
            for w in words(rng, n, taken):
                f.write(json.dumps({"prompt": f"Uppercase: {w}\n", "answer": w.upper()}) + "\n")


if __name__ == "__main__":
    main()
