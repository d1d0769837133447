"""The command line: fast answers for help/validate/schema, and user mistakes that end with exit
status 2 and one `error:` line — no traceback unless --debug."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT, cli, write_recipe

PEFTCLI = [sys.executable, "-m", "peftcli.cli"]


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([*PEFTCLI, *args], capture_output=True, text=True, cwd=cwd, env={**os.environ})


@pytest.mark.parametrize(
    "args", [["--help"], ["schema"], ["methods"], ["validate", "recipes/quickstart.yaml"]]
)
def test_light_commands_answer_without_heavy_imports(args):
    from peftcli.model.builtin import materialise

    materialise("tiny-llama")  # once per machine; then validate reads only JSON headers
    code = (
        "import sys; from peftcli.cli import main; sys.argv = ['peftcli', *sys.argv[1:]]\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'datasets', 'accelerate') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    # What makes them instant is what they do not import; their wall time (~0.3 s here) moves
    # with the machine and its load, so it is not asserted.
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr


def test_schema_is_json_schema_with_every_section(capsys):
    code, out, _ = cli("schema", capsys=capsys)
    schema = json.loads(out)
    assert code == 0 and set(schema["properties"]) == {
        "name",
        "model",
        "peft",
        "data",
        "training",
        "preference",
        "grpo",
        "eval",
    }


def test_methods_lists_lora_and_qlora(capsys):
    code, out, _ = cli("methods", "--json", capsys=capsys)
    names = {m["method"]: m for m in json.loads(out)["methods"]}
    assert code == 0 and {"lora", "qlora"} <= set(names) and names["lora"]["mergeable"]


def test_validate_reports_what_it_checked(capsys):
    code, out, _ = cli("validate", str(ROOT / "recipes" / "quickstart.yaml"), capsys=capsys)
    assert code == 0
    assert "peft: lora on 28 modules" in out and "data: 3000 rows of completion" in out


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["train", "nope.yaml"], "recipe file not found: nope.yaml"),
        (["train"], "Missing argument 'recipe'"),
        (["frobnicate"], "No such command 'frobnicate'"),
        (["train", "recipes/quickstart.yaml", "--no-such-flag"], "No such option: --no-such-flag"),
        (["eval", "/no/such/run"], "no such run, adapter or model folder"),
        (["validate", "recipes/quickstart.yaml", "peft.target_modules=[q_prj]"], "did you mean `q_proj`"),
        (
            ["validate", "recipes/quickstart.yaml", "model.name_or_path=builtin:tiny-lama"],
            "did you mean `tiny-llama`",
        ),
        (
            ["validate", "recipes/quickstart.yaml", "model.name_or_path=./nowhere"],
            "no such folder: ./nowhere",
        ),
        (["validate", "recipes/quickstart.yaml", "data.train=missing.jsonl"], "data.train: file not found"),
        (["validate", "recipes/quickstart.yaml", "peft.options={lora_alfa: 3}"], "did you mean `lora_alpha`"),
        (["validate", "recipes/quickstart.yaml", "data.format=messages"], "needs column `messages`"),
    ],
)
def test_user_mistakes_exit_2_with_one_error_line(args, expected):
    proc = run(*args)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert expected in lines[0]


def test_debug_shows_the_traceback():
    proc = run("--debug", "train", "nope.yaml")
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "UserError" in proc.stderr


def test_recipe_errors_name_the_file_and_key(tmp_path, capsys, completion_data):
    recipe = write_recipe(tmp_path / "r.yaml", training={"max_steps": 2, "lr_sched": "cosine"})
    code, _, err = cli("validate", str(recipe), capsys=capsys)
    assert code == 2 and str(recipe) in err and "unknown key `training.lr_sched`" in err
