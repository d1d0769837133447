"""Data: formats, label masking (prompts masked, every answer's end token supervised),
truncation, held-out split and bad rows reported by file and line."""

from __future__ import annotations

import json

import pytest

from peftcli import builtin
from peftcli.data import IGNORE, Encoder, collate, detect_format, encode_rows, prepare, read_rows
from peftcli.errors import UserError
from peftcli.recipe import DataSection

from .conftest import write_jsonl


@pytest.fixture(scope="module")
def llama_tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(builtin.materialise("tiny-llama"))


@pytest.fixture(scope="module")
def gpt2_tok():
    from peftcli.model import load_tokenizer
    from peftcli.recipe import ModelSection

    return load_tokenizer(ModelSection(name_or_path="builtin:tiny-gpt2"))


def supervised_text(tok, example) -> str:
    return tok.decode([t for t in example["labels"] if t != IGNORE])


def encode(tok, rows, **data):
    section = DataSection(train="x.jsonl", **data)
    fmt = detect_format([("r", r) for r in rows], section.format)
    stats = dict.fromkeys(("examples", "tokens", "supervised_tokens", "truncated", "dropped"), 0)
    split = encode_rows(
        [(f"x.jsonl:{i + 1}", r) for i, r in enumerate(rows)],
        Encoder(tok, fmt, section),
        stats,
        with_references=True,
    )
    return split, stats


def test_completion_masks_the_prompt_and_supervises_eos(llama_tok):
    split, stats = encode(llama_tok, [{"prompt": "Uppercase: abc\n", "completion": "ABC"}])
    ex = split.examples[0]
    assert ex["input_ids"][0] == llama_tok.bos_token_id
    assert llama_tok.decode(ex["input_ids"]) == "<s>Uppercase: abc\nABC</s>"
    assert supervised_text(llama_tok, ex) == "ABC</s>"
    assert stats["supervised_tokens"] == 4
    assert split.references[0].answer == "ABC"
    assert llama_tok.decode(split.references[0].prompt_ids) == "<s>Uppercase: abc\n"


def test_pad_equal_to_eos_does_not_mask_eos(gpt2_tok):
    assert gpt2_tok.pad_token_id == gpt2_tok.eos_token_id  # GPT-2 has no pad token
    split, _ = encode(gpt2_tok, [{"prompt": "q: ", "completion": "a"}])
    assert supervised_text(gpt2_tok, split.examples[0]) == "a<|endoftext|>"
    batch = collate(split.examples + [{"input_ids": [5] * 10, "labels": [5] * 10}], gpt2_tok.pad_token_id)
    row = batch["labels"][0]
    assert row[len(split.examples[0]["input_ids"]) - 1] == gpt2_tok.eos_token_id  # EOS keeps its label
    assert (row[len(split.examples[0]["input_ids"]) :] == IGNORE).all()  # padding carries none


def test_train_on_all_supervises_the_prompt_too(llama_tok):
    split, _ = encode(llama_tok, [{"prompt": "P: ", "completion": "C"}], train_on="all")
    # Position 0 (BOS) is never predicted; everything after it is.
    assert supervised_text(llama_tok, split.examples[0]) == "P: C</s>"


def test_messages_supervise_every_assistant_turn_and_its_end_token(llama_tok):
    conv = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "HELLO"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "HI"},
    ]
    split, _ = encode(llama_tok, [{"messages": conv}])
    ex = split.examples[0]
    assert supervised_text(llama_tok, ex) == "HELLO<|im_end|>HI<|im_end|>"
    assert split.references[0].answer == "HI"
    assert llama_tok.decode(split.references[0].prompt_ids).endswith(
        "again<|im_end|>\n<|im_start|>assistant\n"
    )


def test_text_format_supervises_everything(llama_tok):
    split, _ = encode(llama_tok, [{"text": "hello"}])
    assert supervised_text(llama_tok, split.examples[0]) == "hello</s>"
    assert split.references == []


def test_truncation_and_dropping(llama_tok):
    rows = [{"prompt": "x" * 30, "completion": "yy"}, {"prompt": "p", "completion": "z" * 30}]
    split, stats = encode(llama_tok, rows, max_length=16)
    assert stats["truncated"] == 2 and stats["dropped"] == 1  # the first lost its whole answer
    assert len(split.examples) == 1 and len(split.examples[0]["input_ids"]) == 16


def test_auto_detection_and_explicit_format_mismatch():
    rows = [("r", {"prompt": "a", "completion": "b"})]
    assert detect_format(rows, "auto") == "completion"
    assert detect_format([("r", {"messages": []})], "auto") == "messages"
    with pytest.raises(UserError, match="needs column `text`"):
        detect_format(rows, "text")
    with pytest.raises(UserError, match="cannot tell the format"):
        detect_format([("r", {"question": "a"})], "auto")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"text": "a"}\n{"text": "b"\n', "bad.jsonl:2: invalid JSON"),
        ('{"text": "a"}\n[1, 2]\n', "bad.jsonl:2: expected a JSON object"),
        ("", "has no rows"),
    ],
)
def test_bad_files_are_reported_by_line(tmp_path, content, expected):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(UserError) as info:
        read_rows(str(path))
    assert expected in str(info.value)


def test_bad_rows_are_reported_by_line(tmp_path, llama_tok):
    path = write_jsonl(
        tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": 3}]
    )
    with pytest.raises(UserError, match=r"d.jsonl:2: `completion` must be a string, not int"):
        prepare(DataSection(train=str(path), eval=0.0), llama_tok, seed=0)


def test_json_csv_and_folder_inputs(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"text": "x"}, {"text": "y"}]))
    (tmp_path / "b.csv").write_text('prompt,completion\nhi,there\n"a, b",c\n')
    assert [r for _, r in read_rows(str(tmp_path / "a.json"))] == [{"text": "x"}, {"text": "y"}]
    assert read_rows(str(tmp_path / "b.csv"))[1] == ("b.csv:3", {"prompt": "a, b", "completion": "c"})
    folder = tmp_path / "shards"
    write_jsonl(folder / "0.jsonl", [{"text": "a"}])
    write_jsonl(folder / "1.jsonl", [{"text": "b"}])
    assert len(read_rows(str(folder))) == 2
    with pytest.raises(UserError, match="file not found"):
        read_rows(str(tmp_path / "missing.jsonl"))


def test_held_out_fraction_is_deterministic_and_disjoint(tmp_path, llama_tok):
    rows = [{"prompt": f"p{i} ", "completion": f"c{i}"} for i in range(40)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    a = prepare(DataSection(train=str(path), eval=0.25), llama_tok, seed=1)
    b = prepare(DataSection(train=str(path), eval=0.25), llama_tok, seed=1)
    assert len(a.eval.examples) == 10 and len(a.train.examples) == 30
    assert a.eval.examples == b.eval.examples
    train_ids = {tuple(e["input_ids"]) for e in a.train.examples}
    assert not train_ids & {tuple(e["input_ids"]) for e in a.eval.examples}


def test_packed_rows_give_each_example_its_own_logits(llama_tok):
    """Packing is exact: position ids restart per example and attention never crosses them."""
    import torch
    from transformers import AutoModelForCausalLM

    from peftcli.data import pack
    from peftcli.losses import forward

    model = AutoModelForCausalLM.from_pretrained(builtin.materialise("tiny-llama")).eval()
    rows = [
        {"prompt": f"Uppercase: {w}\n", "completion": w.upper()} for w in ["ab", "cdefg", "hij", "klmnopq"]
    ]
    split, _ = encode(llama_tok, rows)
    packed = pack(split.examples, max_length=48, seed=0)
    assert len(packed) < len(split.examples)
    batch = collate(packed, llama_tok.pad_token_id)
    assert "attention_mask" not in batch and "position_ids" in batch
    with torch.no_grad():
        logits = forward(model, batch, "causal_lm")
        for row, p in enumerate(packed):
            starts = [i for i, pos in enumerate(p["position_ids"]) if pos == 0] + [len(p["position_ids"])]
            for a, b in zip(starts, starts[1:], strict=False):
                alone = model(input_ids=torch.tensor([p["input_ids"][a:b]])).logits[0]
                assert torch.allclose(logits[row, a:b], alone, atol=1e-5)
    # Labels travel with their tokens; every example's answer is still supervised.
    assert sum(sum(t != IGNORE for t in p["labels"]) for p in packed) == sum(
        sum(t != IGNORE for t in e["labels"]) for e in split.examples
    )
