"""`peftcli generate`: the prompt is built exactly as training built it (chat template recorded
with the run, or the completion format), greedy output matches the evaluation's
`generate_answers`, and it works for runs, adapters and merged folders of every task."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from peftcli.commands.generate import prompt_ids
from peftcli.data import Encoder, new_stats
from peftcli.model import builtin
from peftcli.recipe_file import load_recipe
from peftcli.training.evaluate import generate_answers
from peftcli.training.losses import IGNORE
from peftcli.training.run import train

from .conftest import ROOT, cli, write_jsonl, write_recipe

SYSTEM = "You answer in capitals."
CONVERSATION = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "say cat"},
    {"role": "assistant", "content": "CAT"},
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("generate")
    words = ["cat", "dog", "owl", "fox", "emu", "yak", "elk", "ant"] * 3
    chats = [
        {
            "messages": [
                *CONVERSATION[:1],
                {"role": "user", "content": f"say {w}"},
                {"role": "assistant", "content": w.upper()},
            ]
        }
        for w in words
    ]
    write_jsonl(root / "chat.jsonl", chats)
    lines = (ROOT / "data" / "quickstart" / "train.jsonl").read_text().splitlines()[:24]
    (root / "completion.jsonl").write_text("\n".join(lines) + "\n")
    write_jsonl(
        root / "classes.jsonl",
        [
            {"text": w if i % 2 else w.upper(), "label": "lower" if i % 2 else "upper"}
            for i, w in enumerate(words)
        ],
    )
    # The chat run trains on its own copy of tiny-llama, so a test can change that base's template.
    shutil.copytree(builtin.materialise("tiny-llama"), root / "base")
    return root


def train_run(root: Path, name: str, model: str, data: str, task="causal_lm", steps=4):
    folder = root / name
    folder.mkdir()
    recipe = write_recipe(
        folder / "r.yaml",
        model={"name_or_path": model, "task": task},
        data={"train": str(root / data), "eval": 0.25, "max_length": 128},
        training={"max_steps": steps, "lr": 1e-2, "output_dir": str(folder / "run")},
    )
    return train(load_recipe(recipe))


@pytest.fixture(scope="module")
def chat_run(root):
    return train_run(root, "chat", str(root / "base"), "chat.jsonl")


def generated(capsys, *args: str) -> tuple[str, str]:
    code, out, err = cli("generate", *args, capsys=capsys)
    assert code == 0, err
    return out, err


def test_chat_prompt_is_the_training_rendering(chat_run):
    recipe = load_recipe(chat_run.run_dir / "recipe.yaml")
    encoder = Encoder(chat_run.tokenizer, "messages", recipe.data)
    ids = prompt_ids(chat_run.tokenizer, "say cat", "causal_lm", chat=True, system=SYSTEM)
    # The training example of the same conversation: it starts with exactly these ids, none of
    # which carry loss, and the answer's first token (the next one) does.
    example = encoder.example({"messages": CONVERSATION}, "row", new_stats())
    assert example["input_ids"][: len(ids)] == ids
    assert set(example["labels"][: len(ids)]) == {IGNORE} and example["labels"][len(ids)] != IGNORE
    assert chat_run.tokenizer.decode(ids).endswith(
        "<|im_start|>user\nsay cat<|im_end|>\n<|im_start|>assistant\n"
    )
    assert ids == encoder.reference({"messages": CONVERSATION}, "row").prompt_ids


def test_completion_prompt_has_bos_and_no_eos(chat_run):
    tok = chat_run.tokenizer
    ids = prompt_ids(tok, "Uppercase: abc\n", "causal_lm", chat=False, system=None)
    assert ids[0] == tok.bos_token_id and tok.eos_token_id not in ids
    assert ids == [tok.bos_token_id, *tok("Uppercase: abc\n", add_special_tokens=False)["input_ids"]]


def test_greedy_chat_output_is_deterministic_and_equals_generate_answers(chat_run, capsys):
    run = str(chat_run.run_dir)
    args = (run, "--prompt", "say cat", "--chat", "--system", SYSTEM, "--max-new-tokens", "12")
    out, err = generated(capsys, *args)
    assert generated(capsys, *args)[0] == out
    assert err.strip() == "peftcli: prompt rendered with the chat template (--chat)"
    # The run trained on chat data: without --chat its template is used all the same.
    default, err = generated(capsys, *(a for a in args if a != "--chat"))
    assert default == out and "chat template (the run trained on chat data" in err
    ids = prompt_ids(chat_run.tokenizer, "say cat", "causal_lm", chat=True, system=SYSTEM)
    expected = generate_answers(chat_run.model, chat_run.tokenizer, [ids], 12)[0]
    assert out == expected + "\n"
    result = json.loads(generated(capsys, *args, "--json")[0])
    assert result == {"prompt": "say cat", "output": expected, "template": "chat", "empty": not expected}
    # The adapter folder alone and the merged model folder say the same.
    assert generated(capsys, str(chat_run.run_dir / "adapter"), *args[1:])[0] == out
    merged = chat_run.run_dir.parent / "merged"
    assert cli("merge", run, "-o", str(merged), capsys=capsys)[0] == 0
    assert generated(capsys, str(merged), *args[1:])[0] == out


def test_sampling_is_seeded(chat_run, capsys):
    args = (
        str(chat_run.run_dir),
        "-p",
        "say owl",
        "--chat",
        "--temperature",
        "1.5",
        "--max-new-tokens",
        "16",
    )
    first = generated(capsys, *args, "--seed", "1")[0]
    assert generated(capsys, *args, "--seed", "1")[0] == first
    others = {generated(capsys, *args, "--seed", str(s))[0] for s in (2, 3, 4)}
    assert others != {first}


def test_changed_base_template_warns_and_the_recorded_one_is_used(chat_run, root, capsys):
    from transformers import AutoTokenizer

    args = (str(chat_run.run_dir), "-p", "say dog", "--chat", "--max-new-tokens", "8")
    before, _ = generated(capsys, *args)
    base = root / "base"
    saved = {p.name: p.read_bytes() for p in base.iterdir() if p.suffix != ".safetensors"}
    tok = AutoTokenizer.from_pretrained(base)
    tok.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    tok.save_pretrained(base)
    try:
        out, err = generated(capsys, *args)
    finally:  # put the base back as it was
        for path in base.iterdir():
            if path.suffix != ".safetensors" and path.name not in saved:
                path.unlink()
        for name, content in saved.items():
            (base / name).write_bytes(content)
    lines = [line for line in err.strip().splitlines() if "warning" in line]
    assert (
        len(lines) == 1
        and lines[0].startswith("peftcli: warning: the chat template of")
        and "recorded" in lines[0]
    )
    assert out == before


def test_seq2seq_and_classifier_targets(root, capsys):
    t5 = train_run(root, "t5", "builtin:tiny-t5", "completion.jsonl", task="seq2seq_lm", steps=3)
    out, _ = generated(capsys, str(t5.run_dir), "-p", "Uppercase: abc\n", "--max-new-tokens", "6")
    ids = t5.tokenizer("Uppercase: abc\n")["input_ids"]
    assert out == generate_answers(t5.model, t5.tokenizer, [ids], 6)[0] + "\n"

    bert = train_run(root, "bert", "builtin:tiny-bert", "classes.jsonl", task="seq_cls", steps=3)
    result = json.loads(generated(capsys, str(bert.run_dir), "-p", "owl", "--json")[0])
    with torch.no_grad():
        ids = torch.tensor([bert.tokenizer("owl")["input_ids"]], device=next(bert.model.parameters()).device)
        logits = bert.model.eval()(input_ids=ids).logits[0].cpu()
    probs = torch.softmax(logits, -1).tolist()
    assert list(result["probabilities"]) == ["lower", "upper"]
    # float32 softmax of the same model's logits, computed by `generate` and here: rounding is
    # ~1e-7 of a probability (0 measured); 1e-5 is margin.
    assert result["probabilities"] == pytest.approx(
        dict(zip(["lower", "upper"], probs, strict=True)), abs=1e-5
    )
    assert result["label"] == ["lower", "upper"][int(logits.argmax())]
    text, _ = generated(capsys, str(bert.run_dir), "-p", "owl")
    assert text.splitlines()[0] == result["label"] and text.splitlines()[1].startswith("lower ")
    # A merged classifier keeps its class names.
    merged = root / "bert-merged"
    assert cli("merge", str(bert.run_dir), "-o", str(merged), capsys=capsys)[0] == 0
    again = json.loads(generated(capsys, str(merged), "-p", "owl", "--json")[0])
    assert again["label"] == result["label"]
    # Merging rounds W + BA to float32 once (~1e-7 relative per weight): the probabilities move
    # by ~1e-7 (7e-8 measured); 1e-5 is margin.
    assert again["probabilities"] == pytest.approx(result["probabilities"], abs=1e-5)
    # T5 has no chat template: --chat is refused.
    code, _, err = cli("generate", str(t5.run_dir), "-p", "x", "--chat", capsys=capsys)
    assert code == 2 and "needs a chat template" in err


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["-p", "x", "--raw", "--system", "s"], "--raw turns it off"),
        (["-p", "x", "--raw", "--chat"], "--chat and --raw contradict each other"),
        (["-p", "x", "--temperature", "-1"], "--temperature"),
        (["-p", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
        ([], "Missing option '--prompt'"),
    ],
)
def test_argument_mistakes_exit_2(chat_run, capsys, args, expected):
    code, out, err = cli("generate", str(chat_run.run_dir), *args, capsys=capsys)
    lines = err.strip().splitlines()
    assert (
        code == 2 and not out and len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0]
    )


def test_missing_target_exits_2(tmp_path, capsys):
    code, _, err = cli("generate", str(tmp_path / "nope"), "-p", "x", capsys=capsys)
    assert code == 2 and err.startswith("error: no such run, adapter or model folder")
