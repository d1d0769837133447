"""Regenerate data/preference/: a preference the SFT model does not have.

The task is the quickstart's (a made-up lowercase word in capitals). The SFT data ends three
answers in four with a full stop and the rest with `!`; the preference pairs prefer the answer
ending with `!` over the same answer ending with `.`. So after SFT the model knows both endings
and prefers the full stop; preference tuning must turn that preference around. Held-out pairs
use words that occur nowhere in training.

    python scripts/make_preference_data.py
"""

import json
import random
from pathlib import Path

from make_quickstart_data import words  # the same made-up words (scripts/ is on sys.path)

OUT = Path(__file__).resolve().parent.parent / "data" / "preference"


def write(path: Path, rows: list[dict]) -> None:
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def main() -> None:
    rng = random.Random(4321)
    taken: set[str] = set()
    sft, pairs, held_out = words(rng, 2000, taken), words(rng, 1000, taken), words(rng, 64, taken)
    OUT.mkdir(parents=True, exist_ok=True)

    def prompt(w: str) -> str:
        return f"Uppercase: {w}\n"

    marks = ["!" if rng.random() < 0.25 else "." for _ in sft]
    write(OUT / "sft.jsonl", [{"prompt": prompt(w), "completion": w.upper() + m} for w, m in zip(sft, marks, strict=True)])
    for name, ws in (("train", pairs), ("eval", held_out)):
        rows = [{"prompt": prompt(w), "chosen": w.upper() + "!", "rejected": w.upper() + "."} for w in ws]
        write(OUT / f"{name}.jsonl", rows)
    # KTO's unpaired form of the same preference: each answer once, labelled.
    unpaired = [
        {"prompt": prompt(w), "completion": w.upper() + mark, "label": mark == "!"}
        for w in pairs
        for mark in ("!", ".")
    ]
    rng.shuffle(unpaired)
    write(OUT / "unpaired.jsonl", unpaired)


if __name__ == "__main__":
    main()
