"""Issue #13: whatever `train` would refuse, `validate` refuses first, and no setting is silently
ignored. Each refusal ends with exit status 2 and one `error:` line naming the key or file, and
leaves nothing behind; each accepted case does what a user expects. Every command runs the
installed console script in a fresh process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from .conftest import ROOT, one_error_line, run_cli, write_jsonl, write_recipe

CLS = {"model": {"name_or_path": "builtin:tiny-bert", "task": "seq_cls"}}
COMPLETION = [{"prompt": f"Uppercase: w{i}\n", "completion": f"W{i}"} for i in range(8)]


def classes(*labels) -> list[dict]:
    """Classification rows with these labels, each label twice."""
    return [{"text": f"text {i} of {label}", "label": label} for i, label in enumerate(labels * 2)]


def make(tmp_path: Path, files: dict[str, list[dict] | str], **sections) -> Path:
    """Data files (rows → JSON Lines, text → as is) and a recipe using them."""
    for name, content in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            path.write_text(content)
        else:
            write_jsonl(path, content)
    return write_recipe(tmp_path / "recipe.yaml", **sections)


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# (id, data files, recipe sections, the text of the one error line)
REFUSED = [
    # A: the schema states every range the run relies on.
    ("seed-negative", {"train.jsonl": COMPLETION}, {"training": {"seed": -1}}, "`training.seed: -1`"),
    (
        "seed-too-big",
        {"train.jsonl": COMPLETION},
        {"training": {"seed": 2**32}},
        "`training.seed: 4294967296`",
    ),
    ("lr-infinite", {"train.jsonl": COMPLETION}, {"training": {"lr": float("inf")}}, "`training.lr: inf`"),
    ("epochs-nan", {"train.jsonl": COMPLETION}, {"training": {"epochs": float("nan")}}, "training.epochs"),
    ("grad-accum-zero", {"train.jsonl": COMPLETION}, {"training": {"grad_accum": 0}}, "training.grad_accum"),
    ("warmup-one", {"train.jsonl": COMPLETION}, {"training": {"warmup_ratio": 1.0}}, "training.warmup_ratio"),
    (
        "keep-zero",
        {"train.jsonl": COMPLETION},
        {"training": {"keep_checkpoints": 0}},
        "training.keep_checkpoints",
    ),
    ("dropout-one", {"train.jsonl": COMPLETION}, {"peft": {"dropout": 1.0}}, "peft.dropout"),
    ("new-tokens-zero", {"train.jsonl": COMPLETION}, {"eval": {"max_new_tokens": 0}}, "eval.max_new_tokens"),
    ("no-metrics", {"train.jsonl": COMPLETION}, {"eval": {"metrics": []}}, "`eval.metrics: []`"),
    (
        "longer-than-positions",
        {"train.jsonl": COMPLETION},
        {"model": {"name_or_path": "builtin:tiny-gpt2"}, "data": {"max_length": 2000}},
        "data.max_length: 2000 is more than the 1024 positions builtin:tiny-gpt2",
    ),
    (
        "num-labels-on-causal",
        {"train.jsonl": COMPLETION},
        {"model": {"num_labels": 3}},
        "model.num_labels applies to model.task: seq_cls, not causal_lm",
    ),
    # B: the classes the data defines, checked before the run folder exists.
    (
        "num-labels-mismatch",
        {"train.jsonl": classes("neg", "pos")},
        {**CLS, "model": {**CLS["model"], "num_labels": 3}},
        "model.num_labels: 3, but the training data has 2 labels (neg, pos)",
    ),
    (
        "eval-label-unseen",
        {"train.jsonl": classes("neg", "pos"), "eval.jsonl": classes("neg", "neutral")},
        {**CLS, "data": {"eval": "eval.jsonl"}},
        "data.eval: label 'neutral' is not one of the training labels (neg, pos)",
    ),
    # C: metrics the task does not compute, named with those it does.
    (
        "accuracy-on-causal",
        {"train.jsonl": COMPLETION},
        {"eval": {"metrics": ["accuracy"]}},
        "eval.metrics: accuracy does not apply to model.task: causal_lm; it computes loss, perplexity, exact_match",
    ),
    (
        "generation-on-classifier",
        {"train.jsonl": classes("neg", "pos")},
        {**CLS, "eval": {"metrics": ["exact_match", "perplexity"]}},
        "eval.metrics: exact_match, perplexity do not apply to model.task: seq_cls; it computes loss, accuracy, f1",
    ),
    (
        "exact-match-without-answers",
        {"train.jsonl": [{"text": f"plain text {i}"} for i in range(8)]},
        {"eval": {"metrics": ["loss", "exact_match"]}},
        "eval.metrics: exact_match needs prompts with reference answers",
    ),
    # E: a CSV column named twice would silently keep only its last value.
    (
        "duplicate-csv-column",
        {"d.csv": "text,label,label\nhello,pos,neg\nbye,neg,pos\n"},
        {**CLS, "data": {"train": "d.csv"}},
        "d.csv: column `label` appears twice in the header",
    ),
]


# The schema cases fail in load_recipe, shared by every command; these fail in the checks that
# read the model config and the data, which `train` runs before it creates anything.
ALSO_TRAIN = {"seed-negative", "longer-than-positions", "num-labels-mismatch", "eval-label-unseen"}


@pytest.mark.parametrize(
    ("command", "files", "sections", "expected"),
    [pytest.param("validate", *c[1:], id=c[0]) for c in REFUSED]
    + [pytest.param("train", *c[1:], id=f"train-{c[0]}") for c in REFUSED if c[0] in ALSO_TRAIN],
)
def test_validate_refuses_what_train_refuses(tmp_path, command, files, sections, expected):
    recipe = make(tmp_path, files, **sections)
    before = tree(tmp_path)
    line = one_error_line(run_cli(command, str(recipe), cwd=tmp_path, timeout=120))
    assert expected in line, line
    assert tree(tmp_path) == before  # no run folder, nothing written


# (id, data files, recipe sections, text in validate's output)
ACCEPTED = [
    # C: a classifier's default metrics are its own (the default used to be [loss, perplexity]).
    (
        "classifier-default-metrics",
        {"train.jsonl": classes("neg", "pos")},
        CLS,
        "labels: 2 classes (neg, pos)",
    ),
    # D: integer labels are classes by value, not indices into 0..max.
    ("labels-far-apart", {"train.jsonl": classes(0, 50000)}, CLS, "labels: 2 classes (0, 50000)"),
    ("labels-negative", {"train.jsonl": classes(1, -1)}, CLS, "labels: 2 classes (-1, 1)"),
    # E: extensions in any case, for a file and inside a folder.
    (
        "upper-case-file",
        {"train.JSONL": COMPLETION},
        {"data": {"train": "train.JSONL"}},
        "data: 8 rows of completion",
    ),
    (
        "upper-case-in-folder",
        {"folder/a.jsonl": COMPLETION, "folder/B.CSV": 'prompt,completion\n"Uppercase: x\n",X\n'},
        {"data": {"train": "folder"}},
        "data: 9 rows of completion",
    ),
    # A: eval_every without an eval split is said to be ignored, not silently dropped.
    (
        "eval-every-without-eval",
        {"train.jsonl": COMPLETION},
        {"data": {"eval": 0.0}, "training": {"eval_every": 2}},
        "training.eval_every does not apply without an eval split (data.eval: 0.0): ignored",
    ),
]


@pytest.mark.parametrize(
    ("files", "sections", "expected"), [c[1:] for c in ACCEPTED], ids=[c[0] for c in ACCEPTED]
)
def test_validate_accepts(tmp_path, files, sections, expected):
    proc = run_cli("validate", str(make(tmp_path, files, **sections)), cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert expected in proc.stdout, proc.stdout


def test_integer_labels_train_a_head_of_their_classes(tmp_path):
    """D, with C's default: labels {1, -1} train a 2-class head whose order labels.json records;
    the resolved recipe holds the classifier's metrics, and eval.json reports them; an empty
    text is classified (F)."""
    from safetensors import safe_open

    recipe = make(
        tmp_path,
        {"train.jsonl": classes(1, -1, 1, -1)},
        **CLS,
        training={"max_steps": 2, "batch_size": 4},
    )
    proc = run_cli("train", str(recipe), cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    assert json.loads((run / "adapter" / "labels.json").read_text()) == ["-1", "1"]
    with safe_open(run / "adapter" / "adapter_model.safetensors", "pt") as f:
        heads = {
            k: f.get_slice(k).get_shape() for k in f.keys() if "classifier" in k and k.endswith("weight")
        }
    assert heads and all(shape[0] == 2 for shape in heads.values()), heads
    assert yaml.safe_load((run / "recipe.yaml").read_text())["eval"]["metrics"] == ["loss", "accuracy", "f1"]
    assert {"loss", "accuracy", "f1"} <= set(json.loads((run / "eval.json").read_text()))

    proc = run_cli("generate", str(run), "--prompt", "", "--json", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["label"] in ("-1", "1") and set(result["probabilities"]) == {"-1", "1"}


def test_builtin_models_are_targets(tmp_path):
    """G: `builtin:<name>` works for eval and generate as it does in a recipe; F: GPT-2's
    tokenizer adds no BOS, and an empty prompt starts from it, as HF generate does."""
    data = tmp_path / "eval.jsonl"
    data.write_text("".join((ROOT / "data" / "quickstart" / "eval.jsonl").read_text().splitlines(True)[:4]))
    proc = run_cli("eval", "builtin:tiny-llama", "--data", str(data), "--json", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["examples"] == 4

    args = ("builtin:tiny-gpt2", "--prompt", "", "--max-new-tokens", "3", "--json")
    proc = run_cli("generate", *args, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["prompt"] == ""

    line = one_error_line(run_cli("generate", "builtin:tiny-lama", "--prompt", "hi", timeout=300))
    assert "unknown builtin model `tiny-lama` (did you mean `tiny-llama`?)" in line, line
