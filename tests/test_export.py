"""`peftcli export --to gguf` (issue #23), checked by a reader peftcli did not write:
transformers' own GGUF loader (`from_pretrained(folder, gguf_file=...)`) reads every file back;
its logits and token ids are compared with the merged model and the run's tokenizer."""

from __future__ import annotations

import errno
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from gguf import GGUFReader

from peftcli.recipe_file import load_recipe
from peftcli.training.run import train

from .conftest import ROOT, cli, one_error_line, run_cli, write_jsonl, write_recipe

# Unicode (accents, CJK, an emoji), digits, runs of spaces, tabs and newlines.
TEXT = "Uppercase: héllo wörld — 日本語 🙂 12345 3.14159\t\t  three   spaces\n\n\nend  "
CHAT = [
    {"role": "system", "content": "You answer in capitals."},
    {"role": "user", "content": "say  owl 42"},
    {"role": "assistant", "content": "OWL 42"},
]

# The tolerance on the logits, derived from --type. Each weight matrix is rounded once with a
# relative error of at most EPS (float16: 11 significant bits, round to nearest: 2^-11; bfloat16:
# 8 bits: 2^-8; Q8_0: a block of 32 weights shares one scale d = max|w|/127 stored in float16, so
# a weight moves by at most d/2 + 127·|Δd| ≤ max|w|·(1/254 + 2^-11), and with the block maximum at
# ~2.5× a weight's typical size (the largest of 32 near-Gaussian values) that is 2.5·(1/254 +
# 2^-11) relative). Roughly propagated: a logit is reached through M matrices in series (the
# embedding, two per attention and two per MLP block in each of L layers, the head: M = 4L + 2),
# whose relative errors add at worst, so |Δlogit| ≤ M · EPS · max|logit|. Computation in float32
# adds ~1e-6 relative, far below every EPS.
EPS = {"f16": 2**-11, "bf16": 2**-8, "q8_0": 2.5 * (1 / 254 + 2**-11)}
# builtin model, layers L; tiny-llama-bpe has real merges and Llama 3's split rule (llama.cpp's
# and vLLM's checks use it: scripts/interop.py)
MODELS = {"llama": ("tiny-llama", 4), "gpt2": ("tiny-gpt2", 2), "llama-bpe": ("tiny-llama-bpe", 4)}
MEASURED: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def report_measured(one_thread):
    yield
    if MEASURED:  # the README's numbers: pytest -s tests/test_export.py
        print("\nmax |logit difference| per model and type:", json.dumps(MEASURED, indent=1))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A LoRA run per builtin model: the llamas on chat data (so the run's chat template is the
    one trained with), tiny-gpt2 on completions; a few steps with a high learning rate, so the
    merged update is far from zero."""
    root = tmp_path_factory.mktemp("export-runs")
    rows = [
        {
            "messages": [
                *CHAT[:1],
                {"role": "user", "content": f"say {w}"},
                {"role": "assistant", "content": w.upper()},
            ]
        }
        for w in ["cat", "dog", "owl", "fox", "emu", "yak", "elk", "ant"] * 2
    ]
    write_jsonl(root / "chat.jsonl", rows)
    lines = (ROOT / "data" / "quickstart" / "train.jsonl").read_text().splitlines()[:16]
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    out = {}
    for name, (model, _) in MODELS.items():
        recipe = write_recipe(
            root / f"{name}.yaml",
            name=name,
            model={"name_or_path": f"builtin:{model}"},
            peft={"target_modules": "all-linear"},
            data={
                "train": str(root / ("train.jsonl" if name == "gpt2" else "chat.jsonl")),
                "eval": 0,
                "max_length": 128,
            },
            training={"max_steps": 2, "lr": 0.02, "output_dir": str(root / name)},
        )
        train(load_recipe(recipe))
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def merged(runs) -> dict[str, tuple]:
    """The merged model (float32, in memory, as `merge` makes it) and the run's tokenizer."""
    from peftcli.merging import load_tokenizer_of, merged_in_memory, open_sources

    out = {}
    for name, run in runs.items():
        [source] = open_sources([run])
        out[name] = (merged_in_memory(source), load_tokenizer_of(source))
    return out


def errors(stderr: str) -> int:
    """How many `error:` lines (progress lines may come before the one error line)."""
    return sum(line.startswith("error:") for line in stderr.splitlines())


def read_back(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.mark.parametrize("kind", ["f16", "bf16", "q8_0"])
@pytest.mark.parametrize("name", list(MODELS))
def test_export_reads_back_in_transformers(name, kind, runs, merged, tmp_path, capsys):
    out = tmp_path / f"{name}-{kind}.gguf"
    code, _, err = cli(
        "export", str(runs[name]), "--to", "gguf", "-o", str(out), "--type", kind, capsys=capsys
    )
    assert code == 0, err
    assert f"wrote {out}" in err and not list(tmp_path.glob(".*partial*"))
    reference, tokenizer = merged[name]
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    fields = GGUFReader(out).fields
    if merges:  # tiny-llama-bpe's: llama.cpp refuses a byte-level file without them
        written = [
            bytes(fields["tokenizer.ggml.merges"].parts[i]).decode()
            for i in fields["tokenizer.ggml.merges"].data
        ]
        assert written == [" ".join(m) for m in merges] and len(written) > 200
        assert bytes(fields["tokenizer.ggml.pre"].parts[-1]).decode() == "llama-bpe"
    else:  # one token per byte: gguf-py cannot write an empty merges array
        assert "tokenizer.ggml.merges" not in fields
    model, gguf_tokenizer = read_back(out)

    texts = [TEXT]
    if tokenizer.chat_template:  # the template survives, and so do its special tokens
        assert gguf_tokenizer.chat_template == tokenizer.chat_template
        texts.append(tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True))
        assert "<|im_start|>" in texts[-1]
    for text in texts:
        assert gguf_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"], text
    assert gguf_tokenizer.decode(gguf_tokenizer(TEXT)["input_ids"], skip_special_tokens=True) == TEXT

    ids = torch.tensor([tokenizer(t)["input_ids"] for t in texts[-1:]])
    with torch.no_grad():
        want, got = reference(ids).logits, model(ids).logits
    layers = MODELS[name][1]
    difference = (got - want).abs().max().item()
    MEASURED[f"{name} {kind}"] = round(difference, 5)
    # M · EPS · max|logit|, derived above
    assert difference <= (4 * layers + 2) * EPS[kind] * want.abs().max().item(), difference
    assert difference > 0  # the weights really went through --type's rounding


def test_export_in_a_fresh_process_and_force(runs, tmp_path):
    """As a user runs it; a second export needs --force, which replaces only peftcli's file."""
    out = tmp_path / "model.gguf"
    proc = run_cli("export", str(runs["gpt2"]), "-o", str(out), "--type", "q8_0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = out.read_bytes()
    line = one_error_line(run_cli("export", str(runs["gpt2"]), "-o", str(out)))
    assert "already exists" in line and "--overwrite" in line and out.read_bytes() == first
    proc = run_cli("export", str(runs["gpt2"]), "-o", str(out), "--force")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.read_bytes() != first and not list(tmp_path.glob(".*partial*"))


def test_a_file_peftcli_did_not_write_is_never_replaced(runs, tmp_path, capsys):
    mine = tmp_path / "notes.gguf"
    mine.write_text("my own file\n")
    code, _, err = cli("export", str(runs["gpt2"]), "-o", str(mine), "--force", capsys=capsys)
    assert code == 2 and "is not a GGUF file peftcli wrote" in err and errors(err) == 1
    assert mine.read_text() == "my own file\n"


def test_a_method_that_cannot_merge_is_refused(tmp_path, capsys):
    (tmp_path / "train.jsonl").write_text(
        "\n".join((ROOT / "data" / "quickstart" / "train.jsonl").read_text().splitlines()[:16]) + "\n"
    )
    recipe = write_recipe(
        tmp_path / "r.yaml",
        peft={"method": "prompt-tuning"},
        data={"train": str(tmp_path / "train.jsonl"), "eval": 0},
        training={"max_steps": 1},
    )
    train(load_recipe(recipe))
    capsys.readouterr()
    out = tmp_path / "out.gguf"
    code, _, err = cli("export", str(tmp_path / "run"), "-o", str(out), capsys=capsys)
    assert code == 2 and errors(err) == 1, err
    assert "prompt-tuning adapters cannot be merged" in err and "PeftModel.from_pretrained" in err
    assert not out.exists()


def test_an_unknown_architecture_is_refused_before_any_work(tmp_path, capsys):
    """An adapter on a GPT-NeoX base: refused from the config alone (the adapter folder here
    has no weights and the base no checkpoint: nothing is loaded)."""
    base = tmp_path / "neox"
    base.mkdir()
    config = {
        "model_type": "gpt_neox",
        "architectures": ["GPTNeoXForCausalLM"],
        "hidden_size": 32,
        "num_attention_heads": 4,
    }
    (base / "config.json").write_text(json.dumps(config))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    adapter_config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base)}
    (adapter / "adapter_config.json").write_text(json.dumps(adapter_config | {"r": 4, "lora_alpha": 8}))
    out = tmp_path / "out.gguf"
    code, _, err = cli("export", str(adapter), "-o", str(out), capsys=capsys)
    assert code == 2 and errors(err) == 1, err
    assert "cannot export a `gpt_neox` model to GGUF" in err and "llama, mistral, qwen2, qwen3, gpt2" in err
    assert not out.exists()


def test_a_full_disk_leaves_no_partial_file(runs, tmp_path, capsys, monkeypatch):
    """The disk fills up halfway through the tensors (ENOSPC from the write): exit 2, one line,
    no hidden partial file, and the earlier export at OUT untouched."""
    import gguf

    out = tmp_path / "model.gguf"
    assert cli("export", str(runs["gpt2"]), "-o", str(out), capsys=capsys)[0] == 0
    before = out.read_bytes()

    def full(self, **kwargs):
        self.fout[0].write(b"\0" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full)
    code, _, err = cli("export", str(runs["gpt2"]), "-o", str(out), "--force", capsys=capsys)
    assert code == 2 and errors(err) == 1, err
    assert f"error: cannot write {out}: No space left on device" in err
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


SLOW_WRITER = """
import sys, time, gguf
write = gguf.GGUFWriter.write_tensors_to_file
def slow(self, **kwargs):  # the tensors take long to write: time to press Ctrl-C
    time.sleep(60)
    return write(self, **kwargs)
gguf.GGUFWriter.write_tensors_to_file = slow
from peftcli.cli import main
sys.argv = ["peftcli", *sys.argv[1:]]
main()
"""


def test_ctrl_c_midway_leaves_no_partial_file(runs, tmp_path):
    """SIGINT to a fresh process while it writes OUT: exit 130, one line, no file left."""
    out = tmp_path / "model.gguf"
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_WRITER, "export", str(runs["llama"]), "-o", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".model.gguf.partial-*")) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    assert list(tmp_path.glob(".model.gguf.partial-*")), "the export never started writing"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-3000:]
    assert [line for line in err.splitlines() if line.startswith("error:")] == ["error: interrupted"]
    assert "Traceback" not in err and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("model_type", ["mistral", "qwen2", "qwen3"])
def test_other_llama_family_configs_read_back(model_type, tmp_path):
    """Mistral (written as llama.cpp's llama), Qwen2 (attention biases, Qwen2's split rule) and
    Qwen3 (query/key norms): tiny random models through the export stage, read back at f16."""
    from tokenizers import Regex, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM

    from peftcli.export import gguf
    from peftcli.export.arch import arch_of
    from peftcli.export.vocab import QWEN2_SPLIT, check_tokenizer
    from peftcli.model.builtin import CHATML_TEMPLATE, byte_level_tokenizer

    tokenizer = byte_level_tokenizer(
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
        chat_template=CHATML_TEMPLATE,
    )
    if model_type == "qwen2":
        tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN2_SPLIT), "isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    shape = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
    # Qwen3's GGUF config has no head size key; transformers' Qwen3 default (128) is what it reads.
    extra = {"qwen3": {"head_dim": 128}, "qwen2": {}, "mistral": {"head_dim": 16}}[model_type]
    config = AutoConfig.for_model(
        model_type, vocab_size=len(tokenizer), num_key_value_heads=2, **shape, **extra
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    for p in model.parameters():  # random norms and biases too, so a misplaced one shows
        torch.nn.init.normal_(p, std=64**-0.5 if p.ndim > 1 else 0.5)
    out = tmp_path / f"{model_type}.gguf"
    vocab = check_tokenizer(tokenizer, model_type)
    assert vocab.pre == ("qwen2" if model_type == "qwen2" else "gpt-2")
    gguf.write(
        out,
        model,
        tokenizer,
        arch_of(config, model_type),
        vocab,
        "f16",
        {"name": f"tiny-{model_type}"},
        False,
    )
    loaded, gguf_tokenizer = read_back(out)
    chat = tokenizer.apply_chat_template(CHAT, tokenize=False)
    for text in (TEXT, chat):
        assert gguf_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"], text
    ids = torch.tensor([tokenizer(chat)["input_ids"]])
    with torch.no_grad():
        want, got = model(ids).logits, loaded(ids).logits
    difference = (got - want).abs().max().item()
    MEASURED[f"{model_type} f16 (random)"] = round(difference, 5)
    # M · EPS · max|logit| with M = 4L + 2 (see EPS)
    assert difference <= (4 * 2 + 2) * EPS["f16"] * want.abs().max().item(), difference
