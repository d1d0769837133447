"""Vision-language models whose images take a number of tokens that depends on the image
(builtin:tiny-idefics3: Idefics3 cuts an image into tiles by its aspect ratio): peftcli's token ids
equal the processor's own for images of several shapes in one batch, its collated image inputs
equal the processor's, LoRA trains with the vision tower untouched, and the adapter reloads with
plain transformers + PEFT + the processor. Processors whose counts peftcli does not compute are
refused in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .conftest import cli, run_cli, write_jsonl, write_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL = "builtin:tiny-idefics3"
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}
# (width, height): square, wide, tall, very wide; Idefics3 gives them 2x2, 1x2, 2x1, 1x2 tiles
# (+ the whole image as one more tile), 4 tokens a tile.
SIZES = [(40, 40), (64, 16), (20, 50), (120, 30)]


def image_rows(folder: Path, n: int = 16) -> list[dict]:
    """Plain rectangles of four colours and four shapes, asked for their colour."""
    from PIL import Image

    (folder / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        name = list(COLOURS)[i % len(COLOURS)]
        Image.new("RGB", SIZES[i // len(COLOURS) % len(SIZES)], COLOURS[name]).save(
            folder / "img" / f"{i}.png"
        )
        rows.append(
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image", "image": f"img/{i}.png"},
                            {"type": "text", "text": "What colour is it?"},
                        ],
                    },
                    {"role": "assistant", "content": [{"type": "text", "text": name}]},
                ]
            }
        )
    return rows


@pytest.fixture
def image_data(tmp_path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", image_rows(tmp_path))


def tokenizer():
    from peftcli.model.load import load_tokenizer
    from peftcli.recipe import ModelSection

    return load_tokenizer(ModelSection(name_or_path=MODEL, task="image_text_to_text"))


def test_token_ids_and_image_inputs_equal_the_processors_own_for_images_of_several_shapes(tmp_path):
    from PIL import Image

    from peftcli.data import Encoder, new_stats
    from peftcli.data.batching import collate
    from peftcli.recipe import DataSection

    tok = tokenizer()
    processor = tok.processor
    rows = image_rows(tmp_path)
    # One row with an image of every shape, and one row per shape: a batch of five rows.
    many = {
        "messages": [
            {
                "role": "user",
                "content": [
                    *({"type": "image", "image": f"img/{i}.png"} for i in (0, 4, 8, 12)),
                    {"type": "text", "text": "Which is red?"},
                ],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "the first"}]},
        ]
    }
    batch_rows = [many, rows[0], rows[4], rows[8], rows[12]]
    data = write_jsonl(tmp_path / "batch.jsonl", batch_rows)
    encoder = Encoder(tok, "messages", DataSection(train=str(data), max_length=512), "image_text_to_text")
    wheres = [f"data.train: {data}:{i + 1}" for i in range(len(batch_rows))]
    examples = encoder.examples(list(zip(wheres, batch_rows, strict=True)), new_stats())
    image_id = tok.convert_tokens_to_ids("<image>")
    counts = []
    for example, row in zip(examples, batch_rows, strict=True):
        images = [Image.open(f).convert("RGB") for f in example["images"]]
        text = processor.apply_chat_template(row["messages"], tokenize=False)
        # The processor's plain call, as inference makes it (its special tokens included): the
        # same ids, image tokens and tile marks included, position by position.
        assert example["input_ids"] == processor(text=text, images=images)["input_ids"][0]
        counts += [
            processor(text="<image>", images=[image], add_special_tokens=False)["input_ids"][0].count(
                image_id
            )
            for image in images
        ]
    # The processor's own counts: they differ by the image's shape, 2x2, 1x2, 2x1, 1x2 tiles + 1.
    assert counts[:4] == [20, 12, 12, 12] and counts[4:] == counts[:4]
    # Collated: the batch's images in token order, exactly the processor's pixels for that order.
    batch = collate(examples, tok.pad_token_id, processor=processor)
    files = [f for e in examples for f in e["images"]]
    own = processor.image_processor([Image.open(f).convert("RGB") for f in files], return_tensors="pt")
    assert torch.equal(batch["pixel_values"], own["pixel_values"])
    assert torch.equal(batch["pixel_attention_mask"], own["pixel_attention_mask"])
    # The model takes the batch: each image token gets a feature of its own image.
    from transformers import AutoModelForImageTextToText

    from peftcli.model import builtin

    model = AutoModelForImageTextToText.from_pretrained(builtin.materialise("tiny-idefics3")).eval()
    with torch.no_grad():
        logits = model(
            **{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask")}
        )
    assert logits.logits.shape[:2] == batch["input_ids"].shape


RELOAD = """
import json, sys, torch
from PIL import Image
from peft import PeftModel
from transformers import AutoModelForImageTextToText, AutoProcessor
adapter, out, *images = sys.argv[1:]
base = json.load(open(adapter + "/adapter_config.json"))["base_model_name_or_path"]
processor = AutoProcessor.from_pretrained(adapter)
model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base), adapter).eval()
content = [{"type": "image"} for _ in images] + [{"type": "text", "text": "What colour is it?"}]
text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
inputs = processor(text=text, images=[Image.open(i).convert("RGB") for i in images], return_tensors="pt")
with torch.no_grad():
    torch.save({"ids": inputs["input_ids"], "logits": model(**inputs).logits}, out)
assert not any(m.startswith("peftcli") for m in sys.modules)
"""


def test_lora_trains_leaves_the_vision_tower_and_reloads_with_plain_transformers(
    tmp_path, image_data, capsys
):
    from peft import PeftModel
    from safetensors.torch import load_file

    from peftcli.data import Encoder
    from peftcli.data.batching import collate
    from peftcli.model import builtin
    from peftcli.model.load import load_model
    from peftcli.recipe import DataSection, ModelSection

    recipe = write_recipe(
        tmp_path / "r.yaml",
        model={"name_or_path": MODEL, "task": "image_text_to_text"},
        peft={"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        data={"train": str(image_data), "eval": 0, "max_length": 128},
        training={
            "output_dir": str(tmp_path / "run"),
            "max_steps": 6,
            "batch_size": 4,
            "lr": 1e-2,
            "log_every": 1,
        },
        eval={"metrics": ["loss"]},
    )
    assert cli("train", str(recipe), capsys=capsys)[0] == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 6 and sum(losses[-2:]) < sum(losses[:2]), losses
    # LoRA on the language model only: no adapter weight in the vision tower or the connector.
    adapter = tmp_path / "run" / "adapter"
    saved = load_file(adapter / "adapter_model.safetensors")
    assert saved and not any("vision_model" in k or "connector" in k for k in saved), list(saved)[:4]
    # The vision tower and connector of the trained model are the base's, bit for bit.
    section = ModelSection(name_or_path=MODEL, task="image_text_to_text")
    model = PeftModel.from_pretrained(load_model(section), str(adapter)).eval()
    base = load_file(builtin.materialise("tiny-idefics3") / "model.safetensors")
    trained = {k.replace("base_model.model.", ""): v for k, v in model.state_dict().items()}
    frozen = [k for k in base if ".vision_model." in k or ".connector." in k]
    assert frozen and all(torch.equal(trained[k], base[k]) for k in frozen)
    # peftcli's prompt for a wide and a square image, then a fresh process with plain
    # transformers + PEFT + the processor's plain call on the same.
    images = [str(tmp_path / "img" / "5.png"), str(tmp_path / "img" / "1.png")]
    tok = tokenizer()
    content = [{"type": "image", "image": f} for f in images] + [
        {"type": "text", "text": "What colour is it?"}
    ]
    row = {
        "messages": [
            {"role": "user", "content": content},
            {"role": "assistant", "content": [{"type": "text", "text": "x"}]},
        ]
    }
    encoder = Encoder(tok, "messages", DataSection(train=str(image_data)), "image_text_to_text")
    prompt = encoder.reference(row, f"data.train: {image_data}:1")
    reload = [sys.executable, "-c", RELOAD, str(adapter), str(tmp_path / "plain.pt"), *images]
    subprocess.run(reload, check=True)
    plain = torch.load(tmp_path / "plain.pt")
    assert prompt.prompt_ids == plain["ids"][0].tolist()
    batch = collate(
        [{"input_ids": prompt.prompt_ids, "labels": prompt.prompt_ids, "images": prompt.images}],
        tok.pad_token_id,
        processor=tok.processor,
    )
    with torch.no_grad():
        logits = model(
            input_ids=batch["input_ids"],
            pixel_values=batch["pixel_values"],
            pixel_attention_mask=batch["pixel_attention_mask"],
        ).logits
    # float32 forward passes of one model in two processes, same kernels: equal up to float32
    # rounding of 4-layer sums (~1e-6 relative); 1e-5 absolute on logits of size ~1 is margin.
    assert torch.allclose(logits, plain["logits"], rtol=0, atol=1e-5)


@pytest.mark.slow  # merge, eval and generate on image+text are proven on tiny-llava (test_vlm.py)
def test_merge_eval_and_generate_in_fresh_processes(tmp_path, image_data, capsys):
    from peft import PeftModel
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from peftcli.model import builtin

    recipe = write_recipe(
        tmp_path / "r.yaml",
        model={"name_or_path": MODEL, "task": "image_text_to_text"},
        data={"train": str(image_data), "eval": 0.25, "max_length": 128},
        training={"output_dir": str(tmp_path / "run"), "max_steps": 4, "batch_size": 4},
        eval={"metrics": ["loss", "exact_match"], "max_new_tokens": 3},
    )
    assert cli("train", str(recipe), capsys=capsys)[0] == 0
    run = tmp_path / "run"
    proc = run_cli("merge", str(run), "-o", str(tmp_path / "merged"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    processor = AutoProcessor.from_pretrained(tmp_path / "merged")
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged").eval()
    base = AutoModelForImageTextToText.from_pretrained(builtin.materialise("tiny-idefics3"))
    adapted = PeftModel.from_pretrained(base, str(run / "adapter")).eval()
    content = [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    image = Image.open(tmp_path / "img" / "6.png").convert("RGB")
    inputs = processor(text=text, images=[image], return_tensors="pt")
    with torch.no_grad():
        a, b = merged(**inputs).logits, adapted(**inputs).logits
    # float32: W + s·BA folded once vs x·W + s·(x·A)·B, the same sums in another order: rounding
    # of ~1e-7 relative through 4 layers, on logits of size ~1; 1e-4 is margin, not tuned.
    assert torch.allclose(a, b, rtol=0, atol=1e-4), (a - b).abs().max()
    proc = run_cli("eval", str(run), "--data", str(image_data), "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["examples"] == 16 and "exact_match" in result, result
    image = str(tmp_path / "img" / "4.png")
    proc = run_cli(
        "generate", str(run), "--image", image, "--prompt", "What colour?", "--max-new-tokens", "2"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_preview_and_part_counts(tmp_path, image_data, capsys):
    recipe = write_recipe(
        tmp_path / "r.yaml",
        model={"name_or_path": MODEL, "task": "image_text_to_text"},
        data={"train": str(image_data), "eval": 0, "max_length": 128},
        training={"output_dir": str(tmp_path / "run")},
    )
    code, out, err = cli("data", str(recipe), "--preview", "1", capsys=capsys)
    assert code == 0, err[-2000:]
    # Each image as one marker: its 20 tokens and Idefics3's tile marks around them.
    assert "images             16 (12-20 tokens each, none carries loss)" in out, out
    assert f"[20 × <image>: {(tmp_path / 'img' / '0.png').resolve()}]What colour is it?" in out
    # A picture replaced by one of another shape: the cache is not reused, the count follows it.
    from PIL import Image

    Image.new("RGB", (120, 30), COLOURS["red"]).save(tmp_path / "img" / "0.png")
    code, out, err = cli("data", str(recipe), "--preview", "1", capsys=capsys)
    assert code == 0 and "(written now)" in out, out
    assert f"[12 × <image>: {(tmp_path / 'img' / '0.png').resolve()}]" in out
    code, out, err = cli("validate", str(recipe), capsys=capsys)
    assert code == 0, err[-2000:]
    # Idefics3's vision tower, its pixel-shuffle connector and the language model, counted from
    # transformers' own module tree (the same numbers `train` prints).
    from transformers import AutoModelForImageTextToText

    from peftcli.model import builtin
    from peftcli.model.parts import parameter_counts

    model = AutoModelForImageTextToText.from_pretrained(builtin.materialise("tiny-idefics3"))
    counts = parameter_counts(model.named_parameters())
    for part, c in counts.items():
        assert f"{part:<14}  {c['params']:>12,} parameters" in out, (part, out)
    assert counts["vision tower"]["params"] and counts["projector"]["params"]


def test_a_processor_whose_counts_peftcli_does_not_compute_is_refused_in_one_line(
    tmp_path, image_data, capsys
):
    """Qwen2-VL: its processor holds a torchvision video processor (transformers 5.25), so without
    torchvision it does not load; with torchvision, its size-dependent counts are refused."""
    from transformers import Qwen2VLConfig

    from peftcli.data.images import ImageTokens
    from peftcli.errors import UserError
    from peftcli.model.builtin import byte_level_tokenizer

    folder = tmp_path / "qwen2-vl"
    tok = byte_level_tokenizer(
        ["<|endoftext|>", "<|image_pad|>", "<|video_pad|>"], {"eos_token": "<|endoftext|>"}
    )
    tok.save_pretrained(folder)
    Qwen2VLConfig(text_config={"vocab_size": len(tok)}).save_pretrained(folder)
    (folder / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen2VLProcessor"}))
    (folder / "preprocessor_config.json").write_text(
        json.dumps({"image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor"})
    )
    recipe = write_recipe(
        tmp_path / "r.yaml",
        model={"name_or_path": str(folder), "task": "image_text_to_text"},
        data={"train": str(image_data), "eval": 0},
        training={"output_dir": str(tmp_path / "run")},
    )
    code, _, err = cli("data", str(recipe), capsys=capsys)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err[-2000:]
    assert "cannot load the processor" in errors[0] and "Torchvision" in errors[0], errors
    # A processor that loads here and whose count depends on the image's size: LLaVA-NeXT's anyres.
    from transformers import LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(),
        tokenizer=byte_level_tokenizer(["<s>", "<image>"], {"bos_token": "<s>"}),
        patch_size=14,
        vision_feature_select_strategy="default",
        image_token="<image>",
    )
    with pytest.raises(UserError, match="LLaVA-NeXT .* depends on its size"):
        ImageTokens.of(processor)


def test_qlora_quantizes_the_language_model_only():
    """Idefics3 names its parts `vision_model` and `connector` (LLaVA: `vision_tower`,
    `multi_modal_projector`): bitsandbytes must leave both in the model's dtype."""
    bnb = pytest.importorskip("bitsandbytes")
    from peftcli.model.load import load_model
    from peftcli.recipe import ModelSection

    model = load_model(ModelSection(name_or_path=MODEL, task="image_text_to_text", quantization="4bit"))
    four_bit = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit) == 28 and all(".text_model." in n for n in four_bit), four_bit
    kept = [
        n
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and not isinstance(m, bnb.nn.Linear4bit)
    ]
    assert any(".vision_model." in n for n in kept) and any(".connector." in n for n in kept), kept
