"""Vision-language fine-tuning on builtin:tiny-llava: image+text messages train (LoRA, QLoRA, DoRA)
with the loss on the assistant's text only, the frozen parts stay frozen, the adapter reloads with
plain transformers + PEFT and its processor, and bad images are refused in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .conftest import cli, one_error_line, run_cli, write_jsonl, write_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}


def image_rows(folder: Path, n: int = 32) -> list[dict]:
    """Plain squares of four colours, asked for their colour; every other row names its image
    through the `images` column instead of the part."""
    from PIL import Image

    (folder / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        name = list(COLOURS)[i % len(COLOURS)]
        Image.new("RGB", (40, 40), COLOURS[name]).save(folder / "img" / f"{i}.png")
        image = {"type": "image", "image": f"img/{i}.png"} if i % 2 else {"type": "image"}
        row = {
            "messages": [
                {"role": "user", "content": [image, {"type": "text", "text": "What colour is it?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": name}]},
            ]
        }
        if not i % 2:
            row["images"] = [f"img/{i}.png"]
        rows.append(row)
    return rows


@pytest.fixture
def image_data(tmp_path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", image_rows(tmp_path))


def vlm_recipe(tmp_path: Path, name: str = "r", **sections) -> Path:
    sections.setdefault("training", {})
    sections["training"] = {
        "output_dir": str(tmp_path / f"run-{name}"),
        "max_steps": 6,
        **sections["training"],
    }
    model = {"name_or_path": "builtin:tiny-llava", "task": "image_text_to_text", **sections.pop("model", {})}
    data = {"train": str(tmp_path / "train.jsonl"), "max_length": 64, **sections.pop("data", {})}
    return write_recipe(tmp_path / f"{name}.yaml", model=model, data=data, **sections)


def losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def tokenizer():
    from peftcli.model.load import load_tokenizer
    from peftcli.recipe import ModelSection

    return load_tokenizer(ModelSection(name_or_path="builtin:tiny-llava", task="image_text_to_text"))


def test_only_the_assistants_text_carries_loss_token_by_token(tmp_path, image_data):
    from peftcli.data import Encoder, new_stats, read_rows
    from peftcli.recipe import DataSection

    tok = tokenizer()
    encoder = Encoder(tok, "messages", DataSection(train=str(image_data)), "image_text_to_text")
    rows = read_rows(str(image_data))[:4]
    examples = encoder.examples(rows, new_stats())
    image_id = tok.convert_tokens_to_ids("<image>")
    for (where, row), example in zip(rows, examples, strict=True):
        ids, labels = example["input_ids"], example["labels"]
        answer = row["messages"][-1]["content"][0]["text"]
        # 32x32 images in 8x8 patches: 16 tokens each, in one run where the placeholder stood.
        assert ids.count(image_id) == 16
        first = ids.index(image_id)
        assert ids[first : first + 16] == [image_id] * 16
        # The processor's BOS, once, as inference gives it (test_a_template_that_writes_bos_...).
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1 and labels[0] == -100
        supervised = [i for i, y in enumerate(labels) if y != -100]
        # The loss is on exactly the answer and the end of its turn, nothing before it.
        assert tok.decode([ids[i] for i in supervised]) == answer + "<|im_end|>"
        assert supervised == list(range(supervised[0], supervised[0] + len(supervised)))
        assert tok.decode(ids[: supervised[0]]).endswith("<|im_start|>assistant\n")
        assert all(labels[i] == ids[i] for i in supervised)
        assert example["images"] == [
            str((image_data.parent / "img" / f"{rows.index((where, row))}.png").resolve())
        ]


@pytest.mark.parametrize(
    "method,model",
    [("lora", {}), ("dora", {}), ("qlora", {"quantization": "4bit"})],
)
def test_methods_train_on_images_and_text_with_falling_loss(tmp_path, image_data, capsys, method, model):
    recipe = vlm_recipe(
        tmp_path,
        peft={"method": method},
        model=model,
        training={"max_steps": 8, "lr": 5e-3},
        eval={"metrics": ["loss", "exact_match"], "max_new_tokens": 4},
    )
    code, _, err = cli("train", str(recipe), capsys=capsys)
    assert code == 0, err
    run = tmp_path / "run-r"
    seen = losses(run)
    assert seen[-1] < seen[0] * 0.8, seen
    assert "exact_match" in json.loads((run / "eval.json").read_text())
    if method == "qlora":
        assert "vision tower and projector stay in" in err
    # The processor travels with the adapter, so eval, generate and merge find it.
    assert (run / "adapter" / "processor_config.json").is_file()


def test_frozen_parts_are_bitwise_unchanged_after_training(tmp_path, image_data):
    """The vision tower and projector after training equal the base's bit for bit (QLoRA too,
    which leaves them in their dtype); with peft.train_projector the projector trains (a copy,
    saved whole) and the vision tower still does not."""
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    from peftcli.model import builtin
    from peftcli.recipe_file import load_recipe
    from peftcli.training.run import train

    base = AutoModelForImageTextToText.from_pretrained(builtin.materialise("tiny-llava")).model
    for name, sections in {
        "lora": {},
        "qlora": {"peft": {"method": "qlora"}, "model": {"quantization": "4bit"}},
        "projector": {"peft": {"train_projector": True}},
    }.items():
        trained = train(load_recipe(vlm_recipe(tmp_path, name, **sections))).model
        inner = trained.get_base_model().model
        for part in ("vision_tower", "multi_modal_projector"):
            after = dict(getattr(inner, part).named_parameters())
            for key, before in getattr(base, part).named_parameters():
                key = key if key in after else f"original_module.{key}"  # PEFT's modules_to_save wrapper
                assert after[key].dtype == before.dtype and torch.equal(after[key].cpu(), before), (name, key)
                assert not after[key].requires_grad, (name, key)
        saved = load_file(tmp_path / f"run-{name}" / "adapter" / "adapter_model.safetensors")
        assert not any("vision_tower" in k for k in saved), name
        copies = {k: v for k, v in saved.items() if "multi_modal_projector" in k}
        if name != "projector":
            assert not copies and all("language_model" in k for k in saved), (name, sorted(saved)[:4])
            continue
        assert len(copies) == 4  # two linears, weight and bias, saved whole
        for key, value in copies.items():
            original = dict(base.multi_modal_projector.named_parameters())[
                key.split("multi_modal_projector.")[1]
            ]
            assert not torch.equal(value, original), key


def test_bad_images_end_in_one_line_naming_the_row_and_write_nothing(tmp_path, image_data):
    rows = image_rows(tmp_path, 4)
    (tmp_path / "img" / "corrupt.png").write_bytes(b"not a png at all")
    cases = {
        "missing": ({"type": "image", "image": "img/nope.png"}, "image not found"),
        "corrupt": ({"type": "image", "image": "img/corrupt.png"}, "cannot read image"),
        "extra": (None, "has 1 path(s) but only 0 image part(s) take one"),
        "spelled": ({"type": "text", "text": "<image>"}, "1 image(s), but the rendered conversation holds 2"),
    }
    for name, (part, message) in cases.items():
        bad = json.loads(json.dumps(rows))
        if part is None:
            bad[3]["images"] = ["img/0.png"]
        elif part["type"] == "text":  # the placeholder spelled in the text, beside the row's image
            bad[3]["messages"][0]["content"].append(part)
        else:
            bad[3]["messages"][0]["content"][0] = part
        data = write_jsonl(tmp_path / f"{name}.jsonl", bad)
        recipe = vlm_recipe(tmp_path, name, data={"train": str(data)})
        proc = run_cli("train", str(recipe))
        line = one_error_line(proc)
        assert message in line and f"{name}.jsonl:4" in line, line
        assert not (tmp_path / f"run-{name}").exists()
    # An image in a row of a text-only model.
    recipe = vlm_recipe(tmp_path, "text", model={"name_or_path": "builtin:tiny-llama", "task": "causal_lm"})
    line = one_error_line(run_cli("train", str(recipe)))
    assert "train.jsonl:1" in line and "image" in line and "image_text_to_text" in line, line


def test_a_vision_language_model_is_not_loaded_as_a_text_model(tmp_path, image_data):
    recipe = vlm_recipe(tmp_path, model={"task": "causal_lm"})
    line = one_error_line(run_cli("train", str(recipe)))
    assert "vision-language model" in line and "image_text_to_text" in line, line


RELOAD = """
import json, sys, torch
from PIL import Image
from peft import PeftModel
from transformers import AutoModelForImageTextToText, AutoProcessor
adapter, image, out = sys.argv[1:]
base = json.load(open(adapter + "/adapter_config.json"))["base_model_name_or_path"]
processor = AutoProcessor.from_pretrained(adapter)
model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base), adapter).eval()
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]}]
text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
# The model card's way: the processor's plain call, its defaults (special tokens added).
inputs = processor(text=text, images=[Image.open(image)], return_tensors="pt")
# And the processor's own tokenizing template, with the image named in the conversation.
messages[0]["content"][0]["path"] = image
templated = processor.apply_chat_template(
    messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
)
with torch.no_grad():
    logits = model(**inputs).logits
    out_ = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_scores=True,
                          return_dict_in_generate=True)
top2 = torch.stack(out_.scores).topk(2, -1).values
torch.save({
    "ids": inputs["input_ids"], "templated": templated["input_ids"], "logits": logits,
    "templated_pixels": torch.equal(templated["pixel_values"], inputs["pixel_values"]),
    "answer": processor.decode(out_.sequences[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True),
    "margin": (top2[..., 0] - top2[..., 1]).min().item(),
}, out)
assert not any(m.startswith("peftcli") for m in sys.modules)
"""


def test_the_adapter_reloads_with_plain_transformers_peft_and_its_processor(tmp_path, image_data, capsys):
    """HF's documented inference (the processor's plain call, or its tokenizing chat template)
    gives the tokens peftcli trained on, BOS included, and the same logits and greedy answer."""
    from peft import PeftModel

    from peftcli.data import Encoder
    from peftcli.data.batching import collate
    from peftcli.model.load import load_model
    from peftcli.recipe import DataSection, ModelSection

    recipe = vlm_recipe(tmp_path, eval={"metrics": ["loss"]})
    assert cli("train", str(recipe), capsys=capsys)[0] == 0
    adapter = tmp_path / "run-r" / "adapter"
    image = tmp_path / "img" / "1.png"
    subprocess.run(
        [sys.executable, "-c", RELOAD, str(adapter), str(image), str(tmp_path / "plain.pt")], check=True
    )
    plain = torch.load(tmp_path / "plain.pt")
    # peftcli's own pipeline on the same conversation: its tokens, its collated pixels.
    tok = tokenizer()
    row = image_rows(tmp_path, 2)[1]
    row["messages"] = row["messages"][:1]
    encoder = Encoder(tok, "messages", DataSection(train=str(image_data)), "image_text_to_text")
    prompt = encoder.reference(
        {**row, "messages": [*row["messages"], {"role": "assistant", "content": "x"}]},
        f"data.train: {image_data}:2",
    )
    assert prompt.prompt_ids[0] == tok.bos_token_id
    assert prompt.prompt_ids == plain["ids"][0].tolist() == plain["templated"][0].tolist()
    assert plain["templated_pixels"]
    batch = collate(
        [{"input_ids": prompt.prompt_ids, "labels": prompt.prompt_ids, "images": prompt.images}],
        tok.pad_token_id,
        processor=tok.processor,
    )
    section = ModelSection(name_or_path="builtin:tiny-llava", task="image_text_to_text")
    model = PeftModel.from_pretrained(load_model(section), str(adapter)).eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).logits
    # float32 forward passes of one model in two processes, same kernels: equal up to float32
    # rounding of 4-layer sums (~1e-6 relative); 1e-5 absolute on logits of size ~1 is margin.
    atol = 1e-5
    assert torch.allclose(logits, plain["logits"], rtol=0, atol=atol)
    # Greedy answers agree where no step's best two logits are within the two sides' rounding.
    assert plain["margin"] > 2 * atol, plain["margin"]
    code, out, err = cli(
        "generate", str(tmp_path / "run-r"), "--image", str(image), "--prompt", "What colour is it?",
        "--max-new-tokens", "4", "--json", capsys=capsys,
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["output"] == plain["answer"]


def test_a_template_that_writes_bos_gets_one_and_bos_carries_no_loss(tmp_path, image_data):
    """As the processor's tokenizing template does: BOS once, whether the template writes it or
    the tokenizer adds it; text chat formats add none (as the tokenizer's template adds none)."""
    from peftcli.data import Encoder, new_stats, read_rows
    from peftcli.model.builtin_vlm import VLM_CHATML_TEMPLATE
    from peftcli.recipe import DataSection

    tok = tokenizer()
    rows = read_rows(str(image_data))[:2]
    conversation = [
        {"role": "user", "content": [{"type": "image", "path": str(tmp_path / "img" / "1.png")}, {"type": "text", "text": "What colour is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "green"}]},
    ]  # fmt: skip
    for template in (VLM_CHATML_TEMPLATE, "{{ bos_token }}" + VLM_CHATML_TEMPLATE):
        section = DataSection(train=str(image_data), chat_template=template)
        encoder = Encoder(tok, "messages", section, "image_text_to_text")
        for example in encoder.examples(rows, new_stats()):
            assert (
                example["input_ids"].count(tok.bos_token_id) == 1
                and example["input_ids"][0] == tok.bos_token_id
            )
            assert example["labels"][0] == -100
        ids, mask = encoder.encode(rows[1][1], rows[1][0])
        assert ids[0] == tok.bos_token_id and not mask[0]
        hf = tok.processor.apply_chat_template(
            conversation, chat_template=template, tokenize=True, return_dict=True
        )
        assert ids == hf["input_ids"][0], template
    text = Encoder(tok, "messages", DataSection(train=str(image_data)), "causal_lm")
    ids, _ = text.encode(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, "x"
    )
    assert tok.bos_token_id not in ids


def test_merge_writes_a_plain_image_text_folder_equal_to_the_adapter(tmp_path, image_data, capsys):
    from peft import PeftModel
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from peftcli.model import builtin

    recipe = vlm_recipe(tmp_path, eval={"metrics": ["loss"]})
    assert cli("train", str(recipe), capsys=capsys)[0] == 0
    code, _, err = cli("merge", str(tmp_path / "run-r"), "-o", str(tmp_path / "merged"), capsys=capsys)
    assert code == 0, err
    assert "AutoModelForImageTextToText" in err
    processor = AutoProcessor.from_pretrained(tmp_path / "merged")
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged").eval()
    base = AutoModelForImageTextToText.from_pretrained(builtin.materialise("tiny-llava"))
    adapted = PeftModel.from_pretrained(base, str(tmp_path / "run-r" / "adapter")).eval()
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]}
    ]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=text, images=[Image.open(tmp_path / "img" / "3.png")], return_tensors="pt")
    with torch.no_grad():
        a, b = merged(**inputs).logits, adapted(**inputs).logits
    # float32: W + s·BA folded once vs x·W + s·(x·A)·B, the same sums in another order: rounding
    # of ~1e-7 relative through 4 layers, on logits of size ~1; 1e-4 is margin, not tuned.
    assert torch.allclose(a, b, rtol=0, atol=1e-4), (a - b).abs().max()
    assert not torch.allclose(
        a, AutoModelForImageTextToText.from_pretrained(builtin.materialise("tiny-llava"))(**inputs).logits
    )


def test_generate_eval_and_export_in_a_fresh_process(tmp_path, image_data, capsys):
    recipe = vlm_recipe(tmp_path, eval={"metrics": ["loss", "exact_match"], "max_new_tokens": 3})
    assert cli("train", str(recipe), capsys=capsys)[0] == 0
    run = tmp_path / "run-r"
    proc = run_cli(
        "generate",
        str(run),
        "--image",
        str(tmp_path / "img" / "0.png"),
        "--prompt",
        "What colour is it?",
        "--max-new-tokens",
        "3",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["template"] == "chat"
    proc = run_cli("eval", str(run), "--data", str(image_data), "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["examples"] == 32 and "exact_match" in result, result
    first = result["samples"][0]  # a sample names its picture (its decoded prompt cannot show it)
    assert first["images"] == [str((tmp_path / "img" / "0.png").resolve())], first
    line = one_error_line(
        run_cli("generate", str(run), "--image", str(tmp_path / "nope.png"), "--prompt", "x")
    )
    assert "--image: image not found" in line
    line = one_error_line(run_cli("export", str(run), "--to", "gguf", "-o", str(tmp_path / "m.gguf")))
    assert "vision-language model cannot be exported to GGUF" in line and not (tmp_path / "m.gguf").exists()


def test_data_preview_shows_the_image_tokens_and_the_supervised_text(tmp_path, image_data):
    proc = run_cli("data", str(vlm_recipe(tmp_path)), "--preview", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "images             24 (16 tokens each, none carries loss)" in proc.stdout
    assert f"[16 × <image>: {(tmp_path / 'img' / '1.png').resolve()}]What colour is it?" in proc.stdout
    assert "«green<|im_end|>»" in proc.stdout
    assert "\n  <s><|im_start|>user\n" in proc.stdout  # the processor's BOS, as training sees it
    line = one_error_line(run_cli("train", str(vlm_recipe(tmp_path, data={"packing": True}))))
    assert "packing" in line


def test_two_processes_equal_one(tmp_path, image_data, capsys):
    from safetensors.torch import load_file

    from .test_train import EXACT

    common = {"model": {"dtype": "float64"}, "peft": {"dropout": 0.0}}
    runs = {}
    for name, batch, processes in (("one", 8, []), ("two", 4, ["--num-processes", "2"])):
        recipe = vlm_recipe(
            tmp_path, name, **common, training={"batch_size": batch, "max_steps": 4, "mixed_precision": "no"}
        )
        code, _, err = cli("train", str(recipe), *processes, capsys=capsys)
        assert code == 0, err
        runs[name] = load_file(tmp_path / f"run-{name}" / "adapter" / "adapter_model.safetensors")
    # float64 weights: EXACT's reason is at its definition (test_train.py)
    for key in runs["one"]:
        assert torch.allclose(runs["one"][key], runs["two"][key], rtol=0, atol=EXACT), key


def test_sigkill_then_resume_is_bit_exact(tmp_path, image_data, capsys):
    from safetensors.torch import load_file

    from peftcli.recipe_file import load_recipe
    from peftcli.training.run import train

    from .test_resume import EVERY, STEPS, kill_after_first_checkpoint

    recipe = vlm_recipe(
        tmp_path,
        peft={"dropout": 0.1},
        data={"eval": 0.0},
        training={"max_steps": STEPS, "batch_size": 4, "save_every": EVERY, "log_every": 1, "lr": 1e-3},
    )
    run = tmp_path / "run-r"
    assert kill_after_first_checkpoint(recipe, run) < STEPS
    code, _, err = cli("train", str(recipe), "--resume", capsys=capsys)
    assert code == 0 and "resuming" in err, err
    train(load_recipe(recipe, [f"training.output_dir={tmp_path / 'reference'}"]))
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(x) for x in (tmp_path / "reference" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in rows] == [r["loss"] for r in reference]
    resumed = load_file(run / "adapter" / "adapter_model.safetensors")
    uninterrupted = load_file(tmp_path / "reference" / "adapter" / "adapter_model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    for key in resumed:
        assert torch.equal(resumed[key], uninterrupted[key]), key


def test_validate_and_estimate_count_each_part_exactly(tmp_path, image_data):
    from transformers import AutoModelForImageTextToText

    from peftcli.model import builtin

    model = AutoModelForImageTextToText.from_pretrained(builtin.materialise("tiny-llava"))
    params = {
        part: sum(p.numel() for n, p in model.named_parameters() if key(n))
        for part, key in {
            "vision tower": lambda n: "vision_tower" in n,
            "projector": lambda n: "multi_modal_projector" in n,
            "language model": lambda n: "vision_tower" not in n and "multi_modal_projector" not in n,
        }.items()
    }
    # LoRA r=4 on every linear of the language model: r * (in + out) each.
    linears = [
        m for n, m in model.named_modules() if "language_model" in n and isinstance(m, torch.nn.Linear)
    ]
    lora = sum(4 * (m.in_features + m.out_features) for m in linears)
    proc = run_cli("validate", str(vlm_recipe(tmp_path)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout + proc.stderr
    assert f"vision tower  {params['vision tower']:>14,} parameters: frozen" in out, out
    assert f"projector     {params['projector']:>14,} parameters: frozen" in out, out
    assert (
        f"language model{params['language model']:>14,} parameters: lora on {len(linears)} modules" in out
    ), out
    proc = run_cli("estimate", str(vlm_recipe(tmp_path)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"{params['language model'] + lora:,} parameters, {lora:,} trainable: adapted" in proc.stdout, (
        proc.stdout
    )


def test_a_batch_keeps_its_image_counts_straight(tmp_path, image_data):
    """Rows with two, none and one image: one pixel_values in the order their tokens stand, which
    the model matches with its image tokens (it refuses a count that differs)."""
    from peftcli.data import Encoder, new_stats
    from peftcli.data.batching import collate
    from peftcli.data.images import pixel_values
    from peftcli.model.load import load_model
    from peftcli.recipe import DataSection, ModelSection

    image_rows(tmp_path, 3)
    two = {"type": "image", "image": "img/1.png"}, {"type": "image", "image": "img/2.png"}
    rows = [
        {
            "messages": [
                {"role": "user", "content": [*two, {"type": "text", "text": "Same?"}]},
                {"role": "assistant", "content": "no"},
            ]
        },
        {"messages": [{"role": "user", "content": "No image."}, {"role": "assistant", "content": "ok"}]},
        {
            "messages": [
                {"role": "user", "content": [{"type": "image"}]},
                {"role": "assistant", "content": "red"},
            ],
            "images": ["img/0.png"],
        },
    ]
    data = write_jsonl(tmp_path / "mixed.jsonl", rows)
    tok = tokenizer()
    encoder = Encoder(tok, "messages", DataSection(train=str(data)), "image_text_to_text")
    examples = encoder.examples([(f"data.train: {data}:{i + 1}", r) for i, r in enumerate(rows)], new_stats())
    assert [len(e["images"]) for e in examples] == [2, 0, 1]
    batch = collate(examples, tok.pad_token_id, processor=tok.processor)
    files = [str((tmp_path / "img" / f"{i}.png").resolve()) for i in (1, 2, 0)]
    assert torch.equal(batch["pixel_values"], pixel_values(tok.processor, files))
    model = load_model(ModelSection(name_or_path="builtin:tiny-llava", task="image_text_to_text"))
    with torch.no_grad():
        model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
        )


@pytest.mark.parametrize(
    "sections",
    [
        {},
        {"model": {"quantization": "4bit"}, "peft": {"method": "qlora"}},
        {"peft": {"train_projector": True}},
    ],
    ids=["lora", "qlora", "projector"],
)
def test_estimate_counts_and_bytes_equal_the_real_model(tmp_path, image_data, sections):
    from peftcli.commands.estimate import estimate
    from peftcli.methods.apply import apply_method
    from peftcli.model.load import load_model
    from peftcli.recipe_file import load_recipe
    from peftcli.training.accelerator import trainable_summary

    from .test_estimate import tensor_bytes

    recipe = load_recipe(vlm_recipe(tmp_path, **sections))
    est = estimate(recipe)
    real = apply_method(load_model(recipe.model), recipe.peft, "image_text_to_text", total_steps=10)
    counts = trainable_summary(real)
    assert est["total_params"] == counts["total_params"]
    assert est["trainable_params"] == counts["trainable_params"]
    assert est["parts"]["vision tower"]["trainable"] == 0
    assert est["memory"]["weights_bytes"] + est["memory"]["adapter_bytes"] == tensor_bytes(real)  # exact


@pytest.mark.slow  # one process per method (24 s); compare itself is proven on text, training here above
def test_compare_tabulates_methods_on_image_text(tmp_path, image_data, capsys):
    recipe = vlm_recipe(tmp_path, eval={"metrics": ["loss"]})
    out = tmp_path / "cmp"
    code, stdout, err = cli(
        "compare", str(recipe), "--methods", "lora,ia3", "--max-steps", "3", "--output-dir", str(out), "--json",
        capsys=capsys,
    )  # fmt: skip
    assert code == 0, err
    rows = {r["method"]: r for r in json.loads(stdout)["rows"]}
    assert set(rows) == {"lora", "ia3"} and all(r["eval_loss"] > 0 for r in rows.values()), rows


def test_a_vision_encoding_change_moves_image_caches_and_keeps_text_caches(tmp_path, image_data, monkeypatch):
    """An image+text cache written before the encoding changed (here: VISION_VERSION 1, before
    BOS) is not reused; a text cache is, as text encodings did not change."""
    from peftcli.data import cache
    from peftcli.recipe import DataSection

    tok = tokenizer()
    section = DataSection(train=str(image_data), eval=0.0, max_length=64)
    text = DataSection(
        train=str(
            write_jsonl(
                tmp_path / "text.jsonl", [{"prompt": f"Say {i}:", "completion": "ok"} for i in range(8)]
            )
        ),
        eval=0.0,
    )
    with monkeypatch.context() as m:
        m.setattr(cache, "VISION_VERSION", 1)
        old = cache.prepare(section, tok, 0, "image_text_to_text")
        old_text = cache.prepare(text, tok, 0)
    new = cache.prepare(section, tok, 0, "image_text_to_text")
    assert not new.from_cache and new.cache_dir != old.cache_dir
    assert new.train.examples[0]["input_ids"][0] == tok.bos_token_id
    again = cache.prepare(text, tok, 0)
    assert again.from_cache and again.cache_dir == old_text.cache_dir
