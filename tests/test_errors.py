"""Bad input never crashes: a table of broken recipes, data files, model folders and arguments,
each ending with exit status 2, one `error:` line, no traceback, naming the culprit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from .conftest import ROOT, cli

QUICKSTART = yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text())


def recipe(tmp_path: Path, change: dict | None = None, text: str | None = None) -> Path:
    """The quickstart recipe (absolute data paths, output in tmp) with a change merged in."""
    body = json.loads(json.dumps(QUICKSTART))
    body["data"]["train"] = str(ROOT / "data" / "quickstart" / "train.jsonl")
    body["data"]["eval"] = str(ROOT / "data" / "quickstart" / "eval.jsonl")
    body["training"]["output_dir"] = str(tmp_path / "run")
    for section, values in (change or {}).items():
        if isinstance(values, dict) and isinstance(body.get(section), dict):
            body[section].update(values)
        else:
            body[section] = values
    path = tmp_path / "recipe.yaml"
    path.write_text(text if text is not None else yaml.safe_dump(body))
    return path


def data_file(tmp_path: Path, name: str, content: str) -> str:
    path = tmp_path / name
    path.write_text(content)
    return str(path)


def model_folder(tmp_path: Path, config: str | None) -> str:
    folder = tmp_path / f"model-{len(list(tmp_path.glob('model-*')))}"
    folder.mkdir()
    if config is not None:
        (folder / "config.json").write_text(config)
    return str(folder)


# (id, recipe change or None, extra CLI args, text expected in the one error line)
RECIPE_CASES = [
    ("unknown-section", {"trainig": {"lr": 1}}, [], "unknown key `trainig` (did you mean `training`?)"),
    ("unknown-key", {"training": {"learning_rate": 1e-4}}, [], "unknown key `training.learning_rate`"),
    (
        "bad-task",
        {"model": {"name_or_path": "builtin:tiny-llama", "task": "causal"}},
        [],
        "`model.task: causal`",
    ),
    ("bad-method", {"peft": {"method": "lorra"}}, [], "(did you mean `lora`?)"),
    ("rank-zero", {"peft": {"method": "lora", "r": 0}}, [], "peft.r"),
    ("negative-lr", {"training": {"lr": -1.0}}, [], "training.lr"),
    ("eval-fraction", {"data": {"eval": 1.5}}, [], "data.eval"),
    ("max-length-zero", {"data": {"max_length": 0}}, [], "data.max_length"),
    ("batch-zero", {"training": {"batch_size": 0}}, [], "training.batch_size"),
    (
        "qlora-8bit",
        {
            "model": {"name_or_path": "builtin:tiny-llama", "quantization": "8bit"},
            "peft": {"method": "qlora"},
        },
        [],
        "qlora trains on a 4-bit base",
    ),
    (
        "packing-cls",
        {"model": {"name_or_path": "builtin:tiny-bert", "task": "seq_cls"}, "data": {"packing": True}},
        [],
        "data.packing works for causal_lm only",
    ),
    (
        "train-on-all-cls",
        {"model": {"name_or_path": "builtin:tiny-bert", "task": "seq_cls"}, "data": {"train_on": "all"}},
        [],
        "data.train_on: all applies to causal_lm",
    ),
    (
        "unknown-option",
        {"peft": {"method": "lora", "options": {"lora_alfa": 3}}},
        [],
        "did you mean `lora_alpha`",
    ),
    (
        "fixed-option",
        {"peft": {"method": "dora", "options": {"use_dora": False}}},
        [],
        "dora sets it to True",
    ),
    (
        "no-target-match",
        {"peft": {"method": "lora", "target_modules": ["attn.c_attn"]}},
        [],
        "peft.target_modules: `attn.c_attn` matches no linear module",
    ),
    ("layer-out-of-range", {"peft": {"method": "lora", "layers": [7]}}, [], "peft.layers: [7] out of range"),
    (
        "unknown-builtin",
        {"model": {"name_or_path": "builtin:tiny-mistral"}},
        [],
        "unknown builtin model `tiny-mistral`",
    ),
    (
        "llama-adapter-cls",
        {
            "model": {"name_or_path": "builtin:tiny-bert", "task": "seq_cls"},
            "peft": {"method": "llama-adapter"},
            "eval": {"metrics": None},
        },
        [],
        "llama-adapter does not support model.task",
    ),
    (
        "loha-conv1d",
        {"model": {"name_or_path": "builtin:tiny-gpt2"}, "peft": {"method": "loha"}},
        [],
        "loha cannot adapt the Conv1D layers",
    ),
    (
        "lokr-4bit",
        {"model": {"name_or_path": "builtin:tiny-llama", "quantization": "4bit"}, "peft": {"method": "lokr"}},
        [],
        "cannot train on a quantized base",
    ),
    ("causal-on-bert", {"model": {"name_or_path": "builtin:tiny-bert"}}, [], "causal_lm does not fit bert"),
    (
        "seq2seq-on-llama",
        {"model": {"name_or_path": "builtin:tiny-llama", "task": "seq2seq_lm"}},
        [],
        "seq2seq_lm needs an encoder-decoder model",
    ),
    (
        "messages-no-template",
        {"model": {"name_or_path": "builtin:tiny-gpt2"}, "data": {"format": "messages"}},
        [],
        "messages needs column `messages`",
    ),
    (
        "tracker-missing",
        {"training": {"report_to": ["jsonl", "wandb"]}},
        [],
        "report_to: wandb needs the wandb package",
    ),
    ("override-unknown", None, ["training.lrate=1"], "unknown key `training.lrate`"),
    ("override-no-equals", None, ["training.lr"], "override `training.lr` is not key=value"),
]


@pytest.mark.parametrize(
    ("change", "extra", "expected"), [c[1:] for c in RECIPE_CASES], ids=[c[0] for c in RECIPE_CASES]
)
@pytest.mark.parametrize("command", ["validate", "train"])
def test_broken_recipes(tmp_path, capsys, command, change, extra, expected):
    code, out, err = cli(command, str(recipe(tmp_path, change)), *extra, capsys=capsys)
    assert_one_error(code, err, expected)
    assert not (tmp_path / "run").exists(), "nothing is created for a broken recipe"


def assert_one_error(code: int, err: str, expected: str) -> None:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err
    assert lines and lines[-1].startswith("error: "), err
    assert expected in lines[-1], lines[-1]


def _file_cases(tmp_path: Path, case: str) -> tuple[dict | None, list[str], str]:
    """Builds only the case asked for (each writes its own files)."""
    cases = {
        "yaml-syntax": lambda: (None, [], "invalid YAML"),
        "bad-json-line": lambda: (
            {
                "data": {
                    "train": data_file(
                        tmp_path, "d.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": \n'
                    ),
                    "eval": 0.0,
                }
            },
            [],
            "d.jsonl:2: invalid JSON",
        ),
        "not-an-object": lambda: (
            {"data": {"train": data_file(tmp_path, "d.jsonl", '["a", "b"]\n'), "eval": 0.0}},
            [],
            "d.jsonl:1: expected a JSON object",
        ),
        "wrong-type": lambda: (
            {
                "data": {
                    "train": data_file(tmp_path, "d.jsonl", '{"prompt": "a", "completion": 3}\n'),
                    "eval": 0.0,
                }
            },
            [],
            "d.jsonl:1: `completion` must be a string",
        ),
        "missing-field": lambda: (
            {
                "data": {
                    "train": data_file(
                        tmp_path, "d.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n'
                    ),
                    "eval": 0.0,
                }
            },
            [],
            "d.jsonl:2: `completion` is missing",
        ),
        "unknown-columns": lambda: (
            {
                "data": {
                    "train": data_file(tmp_path, "d.jsonl", '{"question": "a"}\n'),
                    "eval": 0.0,
                    "format": "auto",
                }
            },
            [],
            "cannot tell the format from the columns",
        ),
        "unknown-extension": lambda: (
            {"data": {"train": data_file(tmp_path, "d.xml", "<a/>"), "eval": 0.0}},
            [],
            "unknown extension",
        ),
        "missing-data": lambda: (
            {"data": {"train": str(tmp_path / "nope.jsonl")}},
            [],
            "data.train: file not found",
        ),
        "missing-eval": lambda: (
            {"data": {"eval": str(tmp_path / "nope.jsonl")}},
            [],
            "data.eval: file not found",
        ),
        "empty-data": lambda: (
            {"data": {"train": data_file(tmp_path, "d.jsonl", ""), "eval": 0.0}},
            [],
            "has no rows",
        ),
        "no-config": lambda: (
            {"model": {"name_or_path": model_folder(tmp_path, None)}},
            [],
            "has no config.json",
        ),
        "bad-config": lambda: (
            {"model": {"name_or_path": model_folder(tmp_path, "{not json")}},
            [],
            "is not valid JSON",
        ),
        "missing-folder": lambda: (
            {"model": {"name_or_path": str(tmp_path / "nowhere")}},
            [],
            "no such folder",
        ),
    }
    return cases[case]()


FILE_CASES = [
    "yaml-syntax",
    "bad-json-line",
    "not-an-object",
    "wrong-type",
    "missing-field",
    "unknown-columns",
    "unknown-extension",
    "missing-data",
    "missing-eval",
    "empty-data",
    "no-config",
    "bad-config",
    "missing-folder",
]


@pytest.mark.parametrize("case", FILE_CASES)
def test_broken_files(tmp_path, capsys, case):
    change, extra, expected = _file_cases(tmp_path, case)
    path = recipe(
        tmp_path, change, text="model: {name_or_path: x\npeft: [" if case == "yaml-syntax" else None
    )
    code, _, err = cli("train", str(path), *extra, capsys=capsys)
    assert_one_error(code, err, expected)
    if case == "yaml-syntax":
        assert "line" in err


def test_fp16_on_cpu_is_refused(tmp_path, capsys):
    code, _, err = cli(
        "train", str(recipe(tmp_path, {"training": {"mixed_precision": "fp16"}})), capsys=capsys
    )
    assert_one_error(code, err, "fp16 needs a CUDA GPU")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["train"], "Missing argument 'recipe'"),
        (["trian", "r.yaml"], "No such command 'trian'"),
        (["train", "r.yaml", "--resum"], "No such option: --resum"),
        (["eval", "/no/such/run"], "no such run, adapter or model folder"),
        (["eval", "RECIPES"], "is not a run, adapter or model folder"),
        (["train", "QUICKSTART", "--num-processes", "0"], "--num-processes must be at least 1"),
        (["train", "QUICKSTART", "--launch-config", "nope.yaml"], "--launch-config: file not found"),
        (["train", "QUICKSTART", "--resume", "--overwrite"], "contradict"),
        (["validate", "QUICKSTART", "data.eval=2"], "data.eval"),
    ],
)
def test_broken_arguments(tmp_path, capsys, args, expected):
    args = [
        str(recipe(tmp_path)) if a == "QUICKSTART" else str(ROOT / "recipes") if a == "RECIPES" else a
        for a in args
    ]
    code, _, err = cli(*args, capsys=capsys)
    assert_one_error(code, err, expected)


def test_eval_needs_data_when_the_run_has_no_eval_split(tmp_path, capsys, completion_data):
    from .conftest import write_recipe

    path = write_recipe(tmp_path / "r.yaml", data={"eval": 0.0}, training={"max_steps": 1})
    assert cli("train", str(path), capsys=capsys)[0] == 0
    code, _, err = cli("eval", str(tmp_path / "run"), capsys=capsys)
    assert_one_error(code, err, "has no eval split")
    code, _, err = cli(
        "eval", str(tmp_path / "run" / "adapter"), "--data", str(tmp_path / "nope.jsonl"), capsys=capsys
    )
    assert_one_error(code, err, "file not found")


def test_secrets_are_never_written(tmp_path, capsys, monkeypatch, completion_data):
    """A token in the environment or pasted into a recipe value never reaches the run folder
    or the logs."""
    from peftcli.recipe_file import redact

    from .conftest import write_recipe

    token = "hf_" + "aB3dE6gH9jK2mN5pQ8sT1vW4yZ7bC0eF3h"
    monkeypatch.setenv("HF_TOKEN", token)
    path = write_recipe(
        tmp_path / "r.yaml", training={"max_steps": 2}, model={"revision": f"main?token={token}"}
    )
    code, out, err = cli("train", str(path), capsys=capsys)
    assert code == 0, err
    assert token not in out + err
    for f in (tmp_path / "run").rglob("*"):
        if f.is_file():
            assert token.encode() not in f.read_bytes(), f
    assert "revision: main?<redacted>" in (tmp_path / "run" / "recipe.yaml").read_text()
    assert redact({"u": ["https://user:pa55@host/x", "sk-" + "a" * 24], "n": 3}) == {
        "u": ["https://<redacted>@host/x", "<redacted>"],
        "n": 3,
    }


def test_trust_remote_code_is_off_by_default_and_warned_about(tmp_path, capsys, completion_data):
    from .conftest import write_recipe

    path = write_recipe(tmp_path / "r.yaml", training={"max_steps": 1}, model={"trust_remote_code": True})
    code, _, err = cli("train", str(path), capsys=capsys)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if "warning: model.trust_remote_code" in line]
    assert len(warnings) == 1 and "set model.revision" in warnings[0], "\n".join(w[:90] for w in warnings)
    assert (
        yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text())["model"].get("trust_remote_code")
        is None
    )
    from peftcli.recipe import ModelSection

    assert ModelSection(name_or_path="x").trust_remote_code is False
