"""Regenerate data/sentiment/: short reviews labelled positive or negative, for the
classification recipes (BERT-style `seq_cls`), and the same reviews as text-to-text pairs
(`*_t2t.jsonl`, prompt/completion) for encoder-decoder recipes.

    python scripts/make_sentiment_data.py
"""

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "data" / "sentiment"
POSITIVE = ["wonderful", "great", "delightful", "brilliant", "moving", "charming", "superb", "fun", "clever", "warm"]
NEGATIVE = ["awful", "dull", "boring", "clumsy", "tedious", "bland", "messy", "weak", "painful", "flat"]
SUBJECTS = ["the film", "this movie", "the plot", "the acting", "the ending", "the soundtrack", "the script"]
TEMPLATES = ["{s} was {a}", "{s} felt {a} and {b}", "honestly, {s} is {a}", "{s}: {a}, truly {b}"]


def review(rng: random.Random, words: list[str]) -> str:
    a, b = rng.sample(words, 2)
    return rng.choice(TEMPLATES).format(s=rng.choice(SUBJECTS), a=a, b=b)


def main() -> None:
    rng = random.Random(7)
    rows = []
    for i in range(480):
        label = "positive" if i % 2 else "negative"
        rows.append({"text": review(rng, POSITIVE if label == "positive" else NEGATIVE), "label": label})
    rng.shuffle(rows)
    OUT.mkdir(parents=True, exist_ok=True)
    for split, part in {"train": rows[:400], "eval": rows[400:]}.items():
        with (OUT / f"{split}.jsonl").open("w") as f:
            for r in part:
                f.write(json.dumps(r) + "\n")
        with (OUT / f"{split}_t2t.jsonl").open("w") as f:
            for r in part:
                f.write(json.dumps({"prompt": f"sentiment: {r['text']}", "completion": r["label"]}) + "\n")


if __name__ == "__main__":
    main()
