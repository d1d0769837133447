"""Regenerate data/vlm/shapes/: pictures a random vision-language model cannot describe.

Each image is one coloured shape (circle, square or triangle; red, green, blue or yellow) at a
random place and size on a plain white background. Each row shows one image and asks either
"What colour is the shape?" or "Which shape is it?" (the two alternate); the answer is one word.
The eval images are drawn apart from the training images, so exact match on eval measures what
the model sees, not what it remembers. Chance is 1/4 for colour and 1/3 for shape.

    python scripts/make_shapes_data.py
"""

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

OUT = Path(__file__).resolve().parent.parent / "data" / "vlm" / "shapes"
SIZE = 32  # pixels a side
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 70, 220), "yellow": (235, 200, 20)}
SHAPES = ("circle", "square", "triangle")
QUESTIONS = {"colour": "What colour is the shape?", "shape": "Which shape is it?"}
SPLITS = {"train": 1200, "eval": 128}  # images, one row each: more pictures than questions about one


def draw(rng: random.Random, shape: str, colour: str) -> Image.Image:
    """The shape's bounding box is 40-80% of the side, anywhere inside the image."""
    side = rng.randint(int(SIZE * 0.4), int(SIZE * 0.8))
    x, y = rng.randint(0, SIZE - side), rng.randint(0, SIZE - side)
    box = (x, y, x + side - 1, y + side - 1)
    image = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    pen = ImageDraw.Draw(image)
    fill = COLOURS[colour]
    if shape == "circle":
        pen.ellipse(box, fill=fill)
    elif shape == "square":
        pen.rectangle(box, fill=fill)
    else:
        pen.polygon([(x + (side - 1) / 2, y), (x, y + side - 1), (x + side - 1, y + side - 1)], fill=fill)
    return image


def row(image: str, question: str, answer: str) -> dict:
    return {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image", "image": image}, {"type": "text", "text": question}],
            },
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ]
    }


def main() -> None:
    rng = random.Random(1234)
    OUT.mkdir(parents=True, exist_ok=True)
    for old in OUT.glob("*/*.png"):
        old.unlink()
    for split, n in SPLITS.items():
        (OUT / split).mkdir(exist_ok=True)
        with (OUT / f"{split}.jsonl").open("w") as f:
            for i in range(n):
                shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
                name = f"{split}/{i:04d}.png"
                # Palette PNGs: a few hundred bytes each, byte-identical on rerun.
                draw(rng, shape, colour).quantize(colors=8).save(OUT / name, optimize=True)
                kind = ("colour", "shape")[i % 2]
                f.write(json.dumps(row(name, QUESTIONS[kind], colour if kind == "colour" else shape)) + "\n")


if __name__ == "__main__":
    main()
