"""The recipe schema: strict keys, did-you-mean, gathered errors, overrides, every shipped recipe."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from peftcli.errors import UserError
from peftcli.recipe import Recipe
from peftcli.recipe_file import load_recipe, parse_overrides

ROOT = Path(__file__).resolve().parent.parent
MINIMAL = {
    "model": {"name_or_path": "builtin:tiny-llama"},
    "peft": {"method": "lora"},
    "data": {"train": "x.jsonl"},
}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def error_of(tmp_path: Path, recipe: dict | str, *overrides: str) -> str:
    text = recipe if isinstance(recipe, str) else yaml.safe_dump(recipe)
    with pytest.raises(UserError) as info:
        load_recipe(write(tmp_path, text), list(overrides))
    return str(info.value)


def test_minimal_recipe_gets_every_default(tmp_path):
    r = load_recipe(write(tmp_path, yaml.safe_dump(MINIMAL)))
    assert r.name == "r"  # the file's stem
    assert r.output_dir == Path("runs/r")
    assert (r.peft.r, r.peft.alpha, r.training.lr, r.training.scheduler) == (8, 16, 2e-4, "cosine")
    assert r.data.eval == 0.1 and r.model.quantization == "none" and r.training.report_to == ["jsonl"]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"training": {"lrr": 1}}, "unknown key `training.lrr` (did you mean `lr`?)"),
        ({"trainig": {}}, "unknown key `trainig` (did you mean `training`?)"),
        ({"peft": {"method": "lorra"}}, "`peft.method: lorra` is not one of"),
        ({"peft": {"method": "lorra"}}, "(did you mean `lora`?)"),
        ({"peft": {"method": "lora", "r": 0}}, "peft.r"),
        ({"training": {"lr": -1}}, "training.lr"),
        ({"data": {"train": "x.jsonl", "eval": 1.5}}, "data.eval"),
        ({"model": {"name_or_path": "m", "dtype": "fp32"}}, "`model.dtype: fp32` is not one of"),
        ({"model": {"name_or_path": "m", "quantization": "8bit"}, "peft": {"method": "qlora"}}, "qlora"),
        (
            {
                "data": {"train": "x.jsonl", "packing": True},
                "model": {"name_or_path": "m", "task": "seq_cls"},
            },
            "packing",
        ),
    ],
)
def test_recipe_mistakes_name_the_key(tmp_path, change, expected):
    assert expected in error_of(tmp_path, {**MINIMAL, **change})


def test_all_errors_are_reported_together(tmp_path):
    msg = error_of(tmp_path, {**MINIMAL, "training": {"lr": 0, "batch_size": 0, "epochz": 1}})
    assert "3 problems" in msg
    assert "training.lr" in msg and "training.batch_size" in msg and "training.epochz" in msg


def test_missing_required_keys(tmp_path):
    msg = error_of(tmp_path, {"model": {}, "peft": {}})
    assert "`model.name_or_path` is required" in msg
    assert "`peft.method` is required" in msg
    assert "`data` is required" in msg


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "the recipe is empty"),
        ("- a\n- b\n", "must be a mapping"),
        ("model:\n  name_or_path: [unclosed\n", "invalid YAML"),
        ("model: {a: 1\npeft: 2\n", "line"),
    ],
)
def test_unreadable_recipes(tmp_path, text, expected):
    assert expected in error_of(tmp_path, text)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(UserError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_overrides_are_parsed_as_yaml_scalars_and_merged(tmp_path):
    r = load_recipe(
        write(tmp_path, yaml.safe_dump(MINIMAL)),
        ["training.lr=1e-4", "peft.r=16", "peft.target_modules=[q_proj,v_proj]", "data.packing=true"],
    )
    assert r.training.lr == 1e-4 and r.peft.r == 16 and r.data.packing is True
    assert r.peft.target_modules == ["q_proj", "v_proj"]
    assert parse_overrides(["a.b.c=x"]) == {"a": {"b": {"c": "x"}}}


def test_bad_overrides(tmp_path):
    assert "not key=value" in error_of(tmp_path, MINIMAL, "training.lr")
    assert "unknown key `training.lrate`" in error_of(tmp_path, MINIMAL, "training.lrate=1")


def test_method_names_are_normalised_and_qlora_implies_4bit(tmp_path):
    r = load_recipe(write(tmp_path, yaml.safe_dump({**MINIMAL, "peft": {"method": "QLoRA"}})))
    assert r.peft.method == "qlora" and r.model.quantization == "4bit"


def test_relative_data_paths_resolve_against_the_recipe_folder(tmp_path, monkeypatch):
    (tmp_path / "d.jsonl").write_text('{"text": "hi"}\n')
    monkeypatch.chdir("/")
    r = load_recipe(write(tmp_path, yaml.safe_dump({**MINIMAL, "data": {"train": "d.jsonl"}})))
    assert r.data.train == str((tmp_path / "d.jsonl").resolve())


def test_schema_has_a_description_for_every_key():
    schema = Recipe.model_json_schema()
    for name, section in schema["$defs"].items():
        for key, prop in section["properties"].items():
            assert prop.get("description"), f"{name}.{key} has no description"


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path, monkeypatch):
    from peftcli.checks import check_recipe

    monkeypatch.chdir(ROOT)
    text = path.read_text()
    assert text.startswith("# Run:"), "recipes start with the command that runs them"
    recipe = load_recipe(path)
    if recipe.model.name_or_path.startswith("builtin:"):
        assert check_recipe(recipe)


BUILTIN_RECIPES = [p for p in sorted((ROOT / "recipes").rglob("*.yaml")) if "builtin:" in p.read_text()]


@pytest.mark.parametrize("path", BUILTIN_RECIPES, ids=lambda p: str(p.relative_to(ROOT / "recipes")))
def test_every_builtin_recipe_trains(path, tmp_path, monkeypatch):
    """A smoke run of each shipped recipe on its builtin model (3 steps, 8 eval examples)."""
    import json

    from peftcli.training.run import train

    monkeypatch.chdir(ROOT)
    recipe = load_recipe(
        path, ["training.max_steps=3", f"training.output_dir={tmp_path / 'run'}", "training.eval_every=null"]
    )
    if isinstance(recipe.data.eval, str):  # a smaller eval set keeps generation quick
        small = tmp_path / "eval.jsonl"
        small.write_text("".join(Path(recipe.data.eval).read_text().splitlines(keepends=True)[:8]))
        for folder in Path(recipe.data.eval).resolve().parent.iterdir():  # images, relative to the file
            if folder.is_dir():
                (tmp_path / folder.name).symlink_to(folder)
        recipe.data.eval = str(small)
    if recipe.peft.init_from is not None:  # starts from another shipped recipe's run: train that first
        first = next(p for p in BUILTIN_RECIPES if load_recipe(p).name == Path(recipe.peft.init_from).name)
        train(
            load_recipe(
                first, ["training.max_steps=3", f"training.output_dir={tmp_path / 'first'}", "data.eval=0"]
            )
        )
        recipe.peft.init_from = str(tmp_path / "first")
    train(recipe)
    result = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert result["train"]["steps"] == 3 and all(m in result for m in recipe.eval.metrics)
    assert "loss" not in recipe.eval.metrics or result["loss"] > 0  # grpo evaluates rewards, no loss
