"""Data: formats (completion, alpaca, messages, ShareGPT, text, classification; JSONL, JSON, CSV,
TSV, Parquet, text), label masking (prompts masked, every answer's end token supervised),
truncation, held-out split, bad rows reported by file and line, the on-disk cache, packing,
length-grouped batches and `peftcli data`."""

from __future__ import annotations

import json
import random
import shutil

import pytest

from peftcli import data as data_stage
from peftcli.data import (
    Encoder,
    LengthGroupedSampler,
    Source,
    collate,
    detect_format,
    encode_rows,
    hub_spec,
    new_stats,
    pack,
    pack_plan,
    padding_fraction,
    prepare,
    read_rows,
)
from peftcli.errors import UserError
from peftcli.model import builtin
from peftcli.recipe import DataSection
from peftcli.training.losses import IGNORE

from .conftest import cli, write_jsonl, write_recipe


@pytest.fixture(scope="module")
def llama_tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(builtin.materialise("tiny-llama"))


@pytest.fixture(scope="module")
def gpt2_tok():
    from peftcli.model.load import load_tokenizer
    from peftcli.recipe import ModelSection

    return load_tokenizer(ModelSection(name_or_path="builtin:tiny-gpt2"))


def supervised_text(tok, example) -> str:
    return tok.decode([t for t in example["labels"] if t != IGNORE])


def encode(tok, rows, task="causal_lm", **data):
    section = DataSection(train="x.jsonl", **data)
    fmt = detect_format([("r", r) for r in rows], section.format, task=task)
    stats = new_stats()
    split = encode_rows(
        [(f"x.jsonl:{i + 1}", r) for i, r in enumerate(rows)],
        Encoder(tok, fmt, section, task),
        stats,
        with_references=True,
    )
    return split, stats


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "HELLO"},
    {"role": "user", "content": "again"},
    {"role": "assistant", "content": "HI"},
]
SHAREGPT = [
    {"from": "system", "value": "Be brief."},
    {"from": "human", "value": "hi"},
    {"from": "gpt", "value": "HELLO"},
    {"from": "human", "value": "again"},
    {"from": "gpt", "value": "HI"},
]
# A template for a tokenizer without one (GPT-2): each answer ends with EOS, which is also pad.
PLAIN_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


# --------------------------------------------------------------------------- formats and masks


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


def test_alpaca_renders_the_alpaca_prompt_with_and_without_input(llama_tok):
    rows = [
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hi.", "input": "", "output": "hi"},
    ]
    split, _ = encode(llama_tok, rows)
    with_input, without = (llama_tok.decode(e["input_ids"]) for e in split.examples)
    assert with_input == (
        "<s>Below is an instruction that describes a task, paired with an input that provides further "
        "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
        "Add the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n5</s>"
    )
    assert without.startswith("<s>Below is an instruction that describes a task. Write")
    assert "### Input" not in without and without.endswith("### Response:\nhi</s>")
    assert [supervised_text(llama_tok, e) for e in split.examples] == ["5</s>", "hi</s>"]
    assert [r.answer for r in split.references] == ["5", "hi"]
    assert llama_tok.decode(split.references[1].prompt_ids).endswith("### Response:\n")


def test_alpaca_for_seq2seq_puts_the_prompt_in_the_encoder():
    from peftcli.model.load import load_tokenizer
    from peftcli.recipe import ModelSection

    tok = load_tokenizer(ModelSection(name_or_path="builtin:tiny-t5", task="seq2seq_lm"))
    split, _ = encode(tok, [{"instruction": "Shout.", "output": "HEY"}], task="seq2seq_lm")
    ex = split.examples[0]
    assert tok.decode(ex["input_ids"]).endswith("### Instruction:\nShout.\n\n### Response:\n</s>")
    assert tok.decode(ex["labels"]) == "HEY</s>"


def test_messages_supervise_every_assistant_turn_and_its_end_token(llama_tok):
    split, _ = encode(llama_tok, [{"messages": CONVERSATION}])
    ex = split.examples[0]
    assert supervised_text(llama_tok, ex) == "HELLO<|im_end|>HI<|im_end|>"
    assert split.references[0].answer == "HI"
    assert llama_tok.decode(split.references[0].prompt_ids).endswith(
        "again<|im_end|>\n<|im_start|>assistant\n"
    )


def test_sharegpt_multi_turn_with_a_system_turn_equals_messages(llama_tok):
    sharegpt, _ = encode(llama_tok, [{"conversations": SHAREGPT}])
    messages, _ = encode(llama_tok, [{"messages": CONVERSATION}])
    assert sharegpt.examples == messages.examples
    text = llama_tok.decode(sharegpt.examples[0]["input_ids"])
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>")
    assert supervised_text(llama_tok, sharegpt.examples[0]) == "HELLO<|im_end|>HI<|im_end|>"
    everything, _ = encode(llama_tok, [{"conversations": SHAREGPT}], train_on="all")
    ids = everything.examples[0]["input_ids"]
    assert supervised_text(llama_tok, everything.examples[0]) == llama_tok.decode(ids[1:])


def test_sharegpt_rejects_an_unknown_speaker(llama_tok):
    rows = [{"conversations": [{"from": "narrator", "value": "x"}]}]
    with pytest.raises(UserError, match=r"x.jsonl:1: conversations\[0\] has `from: narrator`; use one of"):
        encode(llama_tok, rows)


def test_chat_eos_is_supervised_when_pad_is_eos_with_a_supplied_template(gpt2_tok):
    assert gpt2_tok.chat_template is None
    with pytest.raises(UserError, match="needs a chat template"):
        encode(gpt2_tok, [{"messages": CONVERSATION}])
    split, _ = encode(gpt2_tok, [{"messages": CONVERSATION}], chat_template=PLAIN_TEMPLATE)
    ex = split.examples[0]
    assert supervised_text(gpt2_tok, ex) == "HELLO<|endoftext|>HI<|endoftext|>"
    batch = collate([ex, {"input_ids": [5] * 80, "labels": [5] * 80}], gpt2_tok.pad_token_id)
    eos_positions = [i for i, t in enumerate(ex["input_ids"]) if t == gpt2_tok.eos_token_id]
    assert len(eos_positions) == 2
    assert all(batch["labels"][0, i] == gpt2_tok.eos_token_id for i in eos_positions)


def test_chat_template_from_a_jinja_file(tmp_path, gpt2_tok):
    (tmp_path / "plain.jinja").write_text(PLAIN_TEMPLATE)
    split, _ = encode(gpt2_tok, [{"messages": CONVERSATION}], chat_template=str(tmp_path / "plain.jinja"))
    assert supervised_text(gpt2_tok, split.examples[0]) == "HELLO<|endoftext|>HI<|endoftext|>"
    with pytest.raises(UserError, match="data.chat_template: file not found: nope.jinja"):
        encode(gpt2_tok, [{"messages": CONVERSATION}], chat_template="nope.jinja")


def test_text_format_supervises_everything(llama_tok):
    split, _ = encode(llama_tok, [{"text": "hello"}])
    assert supervised_text(llama_tok, split.examples[0]) == "hello</s>"
    assert split.references == []


def test_truncation_and_dropping(llama_tok):
    rows = [{"prompt": "x" * 30, "completion": "yy"}, {"prompt": "p", "completion": "z" * 30}]
    split, stats = encode(llama_tok, rows, max_length=16)
    assert stats["truncated"] == 2 and stats["dropped"] == 1  # the first lost its whole answer
    assert stats["rows"] == 2 and stats["examples"] == 1
    assert len(split.examples) == 1 and len(split.examples[0]["input_ids"]) == 16


def test_auto_detection_and_explicit_format_mismatch():
    rows = [("r", {"prompt": "a", "completion": "b"})]
    assert detect_format(rows, "auto") == "completion"
    assert detect_format([("r", {"messages": []})], "auto") == "messages"
    assert detect_format([("r", {"conversations": [], "id": 1})], "auto") == "sharegpt"
    assert detect_format([("r", {"instruction": "i", "input": "", "output": "o"})], "auto") == "alpaca"
    with pytest.raises(UserError, match="needs column `text`"):
        detect_format(rows, "text")
    with pytest.raises(UserError, match="alpaca needs column `instruction`"):
        detect_format(rows, "alpaca")
    with pytest.raises(UserError, match="cannot tell the format"):
        detect_format([("r", {"question": "a"})], "auto")
    with pytest.raises(UserError, match="sharegpt does not fit model.task: seq_cls"):
        detect_format([("r", {"conversations": []})], "sharegpt", task="seq_cls")


# --------------------------------------------------------------------------- files


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
    assert not list(data_stage.cache_root().glob(".*.tmp-*"))  # nothing half-written is left


def test_json_csv_tsv_parquet_text_and_folder_inputs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.json").write_text(json.dumps([{"text": "x"}, {"text": "y"}]))
    (tmp_path / "b.csv").write_text('prompt,completion\nhi,there\n"a, b",c\n')
    (tmp_path / "c.tsv").write_text("instruction\tinput\toutput\nadd\t1 2\t3\n")
    (tmp_path / "e.txt").write_text("first line\n\nsecond line\n")
    pq.write_table(pa.table({"prompt": ["p1", "p2"], "completion": ["c1", "c2"]}), tmp_path / "d.parquet")
    assert [r for _, r in read_rows(str(tmp_path / "a.json"))] == [{"text": "x"}, {"text": "y"}]
    # Every row's location has one shape: the recipe key, the file's path, the line or row.
    at = f"data.train: {tmp_path}"
    assert read_rows(str(tmp_path / "b.csv"))[1] == (f"{at}/b.csv:3", {"prompt": "a, b", "completion": "c"})
    assert read_rows(str(tmp_path / "c.tsv")) == [
        (f"{at}/c.tsv:2", {"instruction": "add", "input": "1 2", "output": "3"})
    ]
    assert read_rows(str(tmp_path / "d.parquet"))[1] == (
        f"{at}/d.parquet row 2",
        {"prompt": "p2", "completion": "c2"},
    )
    assert read_rows(str(tmp_path / "e.txt")) == [
        (f"{at}/e.txt:1", {"text": "first line"}),
        (f"{at}/e.txt:3", {"text": "second line"}),
    ]
    (tmp_path / "f.csv").write_text("prompt,completion\nonly-one-field\n")
    with pytest.raises(UserError, match="f.csv:2: the row does not have the header's columns"):
        read_rows(str(tmp_path / "f.csv"))
    folder = tmp_path / "shards"
    write_jsonl(folder / "0.jsonl", [{"text": "a"}])
    write_jsonl(folder / "1.jsonl", [{"text": "b"}])
    assert len(read_rows(str(folder))) == 2
    with pytest.raises(UserError, match="file not found"):
        read_rows(str(tmp_path / "missing.jsonl"))


def test_hub_dataset_ids():
    assert hub_spec("tatsu-lab/alpaca") == ("tatsu-lab/alpaca", None, "train")
    assert hub_spec("HuggingFaceH4/ultrachat_200k:train_sft") == (
        "HuggingFaceH4/ultrachat_200k",
        None,
        "train_sft",
    )
    assert hub_spec("openai/gsm8k@main:test") == ("openai/gsm8k", "main", "test")
    assert data_stage.is_hub_dataset("openai/gsm8k@main:test")
    assert not data_stage.is_hub_dataset("data/missing.jsonl")
    with pytest.raises(UserError, match="data.train: cannot load hub dataset `peftcli-test/none@x:y`"):
        Source("peftcli-test/none@x:y").first()  # offline and not in the cache


# --------------------------------------------------------------------------- held-out split and cache


def test_held_out_fraction_is_deterministic_and_disjoint(tmp_path, llama_tok):
    rows = [{"prompt": f"p{i} ", "completion": f"c{i}"} for i in range(40)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    a = prepare(DataSection(train=str(path), eval=0.25), llama_tok, seed=1)
    b = prepare(DataSection(train=str(path), eval=0.25), llama_tok, seed=1)
    assert len(a.eval.examples) == 10 and len(a.train.examples) == 30
    assert a.eval.examples == b.eval.examples and len(a.eval.references) == 10
    train_ids = {tuple(e["input_ids"]) for e in a.train.examples}
    assert not train_ids & {tuple(e["input_ids"]) for e in a.eval.examples}
    assert len(train_ids) == 30


def test_cached_examples_equal_in_memory_encoding(tmp_path, llama_tok):
    rows = [{"conversations": SHAREGPT}] * 3 + [{"conversations": SHAREGPT[:3]}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    prepared = prepare(DataSection(train=str(path), eval=0.0), llama_tok, seed=0)
    split, stats = encode(llama_tok, rows)
    assert isinstance(prepared.train.examples, data_stage.TokenArrays)
    assert prepared.format == "sharegpt" and prepared.eval is None
    assert prepared.train.examples == split.examples
    assert {k: prepared.stats[k] for k in stats} == stats


def test_cache_hit_skips_preparation_and_every_input_change_misses(
    tmp_path, llama_tok, gpt2_tok, monkeypatch, capsys
):
    rows = [{"prompt": f"Uppercase: w{i}\n", "completion": f"W{i}"} for i in range(30)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    section = DataSection(train=str(path), eval=0.2, max_length=32)
    first = prepare(section, llama_tok, seed=0)
    assert not first.from_cache
    assert "data: format completion (detected from the columns prompt, completion)" in capsys.readouterr().err

    def no_tokenising(*args, **kwargs):
        raise AssertionError("a cache hit must not tokenise")

    no_eval = section.model_copy(update={"eval": 0.0})
    assert not prepare(no_eval, llama_tok, seed=0).from_cache
    with monkeypatch.context() as m:
        m.setattr(Encoder, "examples", no_tokenising)
        m.setattr(data_stage.cache, "scan", no_tokenising)
        again = prepare(section, llama_tok, seed=0)
        copy = tmp_path / "elsewhere" / "same.jsonl"
        copy.parent.mkdir()
        shutil.copy(path, copy)
        moved = prepare(section.model_copy(update={"train": str(copy)}), llama_tok, seed=0)
        no_eval_other_seed = prepare(no_eval, llama_tok, seed=7)  # the seed only picks the held-out rows
    assert again.from_cache and moved.from_cache and no_eval_other_seed.from_cache
    assert "data: loaded 24 examples from cache" in capsys.readouterr().err
    assert again.train.examples == first.train.examples and again.eval.references == first.eval.references
    assert again.cache_dir == first.cache_dir

    changed = {
        "max_length": prepare(section.model_copy(update={"max_length": 16}), llama_tok, seed=0),
        "train_on": prepare(section.model_copy(update={"train_on": "all"}), llama_tok, seed=0),
        "eval": prepare(section.model_copy(update={"eval": 0.3}), llama_tok, seed=0),
        "seed": prepare(section, llama_tok, seed=1),
        "packing": prepare(section.model_copy(update={"packing": True}), llama_tok, seed=0),
        "tokenizer": prepare(section, gpt2_tok, seed=0),
    }
    write_jsonl(path, rows[:-1] + [{"prompt": "Uppercase: x\n", "completion": "Y"}])
    changed["file"] = prepare(section, llama_tok, seed=0)
    assert {k: p.from_cache for k, p in changed.items()} == dict.fromkeys(changed, False)
    assert len({p.cache_dir for p in changed.values()} | {first.cache_dir}) == len(changed) + 1


def test_packing_on_disk_equals_packing_in_memory(tmp_path, llama_tok):
    rows = [{"prompt": f"Uppercase: {'ab' * (i % 7)}\n", "completion": "X" * (i % 5)} for i in range(50)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    prepared = prepare(DataSection(train=str(path), eval=0.0, packing=True, max_length=48), llama_tok, seed=3)
    split, _ = encode(llama_tok, rows, max_length=48)
    assert prepared.train.examples == pack(split.examples, 48, seed=3)
    assert prepared.stats["sequences"] == len(prepared.train.examples) < prepared.stats["examples"] == 50


def test_pack_plan_is_first_fit():
    def naive(lengths, max_length, seed):
        order = list(range(len(lengths)))
        random.Random(seed).shuffle(order)
        rows: list[list[int]] = []
        for i in order:
            row = next((r for r in rows if sum(lengths[j] for j in r) + lengths[i] <= max_length), None)
            if row is None:
                rows.append(row := [])
            row.append(i)
        return rows

    lengths = [random.Random(5).randint(1, 64) for _ in range(300)]
    assert pack_plan(lengths, 64, seed=9) == naive(lengths, 64, 9)
    assert pack_plan([10, 80, 10], 64, seed=0) == naive([10, 80, 10], 64, 0)  # too long: a row alone


def test_packed_rows_give_each_example_its_own_logits(llama_tok):
    """Packing is exact: position ids restart per example and attention never crosses them."""
    import torch
    from transformers import AutoModelForCausalLM

    from peftcli.training.losses import forward

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
                ids = torch.tensor([p["input_ids"][a:b]], device=logits.device)
                alone = model(input_ids=ids).logits[0]
                # float32 logits (|z| < 4) of one example in a 48-token packed row and alone:
                # other matmul/attention shapes sum in another order through 4 layers (~4e-6
                # measured); 1e-5 + 1e-5·|z| is ~10x that, where attention across examples
                # would change the logits at the scale of the logits themselves.
                assert torch.allclose(logits[row, a:b], alone, atol=1e-5)
    # Labels travel with their tokens; every example's answer is still supervised.
    assert sum(sum(t != IGNORE for t in p["labels"]) for p in packed) == sum(
        sum(t != IGNORE for t in e["labels"]) for e in split.examples
    )


# --------------------------------------------------------------------------- batching


def test_length_grouped_batches_waste_less_padding():
    import numpy as np

    lengths = np.array([random.Random(i).randint(20, 400) for i in range(1000)])
    sampler = LengthGroupedSampler(lengths, batch_size=8, seed=0, mega=10)
    first = list(sampler)
    assert sorted(first) == list(range(1000)) and first == list(sampler)  # a permutation, seeded
    sampler.set_epoch(1)
    assert list(sampler) != first  # a new order every epoch
    assert lengths[first[:8]].max() == lengths.max()  # the longest batch comes first
    batches = [lengths[first[i : i + 8]] for i in range(0, 1000, 8)]
    assert np.mean([b.max() - b.min() for b in batches]) < 60  # similar lengths in a batch
    grouped = padding_fraction(lengths, 8, seed=0, grouped=True)
    shuffled = padding_fraction(lengths, 8, seed=0, grouped=False)
    assert grouped < 0.1 < 0.3 < shuffled
    odd = LengthGroupedSampler(lengths[:21], batch_size=8, seed=0, mega=2).order()
    assert sorted(odd.tolist()) == list(range(21)) and len(set(odd[-5:].tolist())) == 5


# --------------------------------------------------------------------------- the command line


def test_data_command_json_shape_and_cache(tmp_path, capsys, completion_data):
    # Data no other test uses, so the first call cannot hit a cache entry another test made.
    lines = completion_data.read_text().splitlines(keepends=True)
    lines[0] = json.dumps({"prompt": "Uppercase: zqxjkvbw\n", "completion": "ZQXJKVBW"}) + "\n"
    completion_data.write_text("".join(lines))
    recipe = write_recipe(tmp_path / "r.yaml", data={"format": "auto"})
    code, out, err = cli("data", str(recipe), "--preview", "2", "--json", capsys=capsys)
    assert code == 0, err
    result = json.loads(out)
    assert set(result) == {"stats", "examples"}
    expected = {"examples", "rows", "tokens", "supervised_tokens", "padding_fraction", "truncated", "dropped"}
    assert expected <= set(result["stats"])
    assert result["stats"]["rows"] == 48 and result["stats"]["examples"] == 48  # 64 rows, 0.25 held out
    assert 0 < result["stats"]["padding_fraction"] < 1
    assert [set(e) for e in result["examples"]] == [{"text", "target"}] * 2
    first = result["examples"][0]
    assert first["text"].startswith("<s>Uppercase: ") and first["text"].endswith(first["target"])
    assert first["target"].endswith("</s>") and first["target"][:-4].isupper()
    assert "data: format completion (detected" in err and "data: prepared 48 examples" in err

    code, out, err = cli("data", str(recipe), "data.group_by_length=true", capsys=capsys)
    assert code == 0 and "data: loaded 48 examples from cache" in err
    assert "supervised tokens" in out and "grouped by length" in out and "«" in out and "</s>»" in out


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (
            ['{"prompt": "a", "completion": "b"}', '{"prompt": "a", "completion": "b"}', '{"prompt": "a",'],
            "train.jsonl:3: invalid JSON",
        ),
        (['{"prompt": "a", "completion": "b"}', '{"prompt": "a"}'], "train.jsonl:2: `completion` is missing"),
    ],
)
@pytest.mark.parametrize("command", ["data", "validate", "train"])
def test_bad_rows_exit_2_naming_file_and_line(tmp_path, capsys, lines, expected, command):
    (tmp_path / "train.jsonl").write_text("\n".join(lines * 1) + "\n")
    recipe = write_recipe(tmp_path / "r.yaml", data={"eval": 0.0})
    code, _, err = cli(command, str(recipe), capsys=capsys)
    assert code == 2 and expected in err and err.count("error:") == 1, err
    assert not (tmp_path / "run" / "adapter").exists()


def test_chat_recipe_validates_and_trains_from_the_cache(tmp_path, capsys, gpt2_tok):
    rows = [
        {
            "conversations": [
                {"from": "system", "value": "Capitals."},
                {"from": "human", "value": w},
                {"from": "gpt", "value": w.upper()},
            ]
        }
        for w in ["cat", "dog", "owl", "fox", "emu", "yak", "elk", "ant"] * 3
    ]
    write_jsonl(tmp_path / "train.jsonl", rows)
    (tmp_path / "plain.jinja").write_text(PLAIN_TEMPLATE)
    recipe = write_recipe(
        tmp_path / "r.yaml",
        model={"name_or_path": "builtin:tiny-gpt2"},
        data={"chat_template": "plain.jinja", "group_by_length": True},
        training={"max_steps": 2},
    )
    code, out, err = cli("validate", str(recipe), capsys=capsys)
    assert code == 0, err
    assert "data: 24 rows of sharegpt (detected from the columns conversations)" in out
    code, out, err = cli("data", str(recipe), "--json", "--preview", "1", capsys=capsys)
    assert code == 0, err
    assert json.loads(out)["examples"][0]["target"].endswith("<|endoftext|>")
    code, _, err = cli("train", str(recipe), capsys=capsys)
    assert code == 0, err
    assert "data: format sharegpt" in err and "data: loaded 18 examples from cache" in err
    saved = json.loads((tmp_path / "run" / "adapter" / "tokenizer_config.json").read_text())
    template = (
        saved.get("chat_template") or (tmp_path / "run" / "adapter" / "chat_template.jinja").read_text()
    )
    assert template == PLAIN_TEMPLATE  # generation after training renders the same way
    code, _, err = cli("data", str(recipe), "data.chat_template=missing.jinja", capsys=capsys)
    assert code == 2 and "data.chat_template: file not found: missing.jinja" in err


def test_bucketed_padding_keeps_the_loss_per_token():
    """Lengths rounded up to a multiple (64 on a GPU) within max_length: more masked padding, the
    same loss per supervised token, padded and packed, on learned (GPT-2) and rotary positions."""
    from functools import partial

    import torch

    from peftcli.data.batching import collate, collator, pad_multiple, padded_length
    from peftcli.data.splits import Prepared, Split
    from peftcli.training.losses import loss_sum

    assert pad_multiple("cpu") == 1 and pad_multiple("cuda") == 64
    assert [padded_length(n, 64, 100) for n in (1, 64, 65, 90, 100)] == [64, 64, 100, 100, 100]
    assert padded_length(37) == 37 and padded_length(65, 64) == 128

    from transformers import AutoModelForCausalLM

    g = torch.Generator().manual_seed(0)
    rows = []
    for n in (23, 70, 41):  # the longest, 70, becomes 100 with limit 100 (128 is past it)
        ids = torch.randint(3, 250, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE] * (n // 3) + ids[n // 3 :]})
    packed = [{**rows[0], "position_ids": list(range(23))}, {**rows[1], "position_ids": list(range(70))}]
    data = Prepared("completion", Split(rows), None, max_length=100)
    for name in ("tiny-llama", "tiny-gpt2"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(builtin.materialise(name), dtype=torch.float64)
        for examples in (rows, packed):
            plain = collator(data, "cpu", partial(collate, pad_id=0))(examples)
            bucketed = collator(data, "cpu", partial(collate, pad_id=0))  # with the GPU's rule below
            bucketed = bucketed.func(examples, **{**bucketed.keywords, "multiple": pad_multiple("cuda")})
            assert plain["input_ids"].shape[1] == 70 and bucketed["input_ids"].shape[1] == 100
            assert bucketed["labels"].shape == bucketed["input_ids"].shape
            assert int(bucketed["num_tokens"]) == int(plain["num_tokens"])
            with torch.no_grad():
                want, got = (loss_sum(model, b, "causal_lm").item() for b in (plain, bucketed))
            # float64: the padded keys are masked out exactly (exp(-inf) = 0) and only the matmuls'
            # shapes change: rounding ~1e-16 relative per op over a few hundred ops; 1e-12 leaves
            # 10x, while one padded position leaking into the loss moves it by ~1/80.
            assert got == pytest.approx(want, rel=1e-12)
