"""Issue #22: one validation pass. `peftcli validate` and `train` run the same entry
(peftcli.validation.validate), so they refuse the same recipes with the same line, and a `train`
runs it once: the checks, the protected paths and the folder's plan each once per process."""

from __future__ import annotations

from pathlib import Path

import pytest

from peftcli.errors import UserError
from peftcli.recipe_file import load_recipe

from .conftest import write_jsonl, write_recipe
from .test_user_mistakes import COMPLETION, REFUSED, make


def refusal(action) -> str | None:
    try:
        action()
    except UserError as exc:
        return str(exc)
    return None


def location_cases(tmp: Path) -> list[tuple[str, list[str]]]:
    """Folders the run may not use, which validate now refuses as train does."""
    (tmp / "afile").write_text("x\n")
    run = tmp / "done"
    (run / "adapter").mkdir(parents=True)
    (run / ".peftcli").write_text('{"kind": "run"}\n')
    return [
        ("working-directory", ["training.output_dir=."]),
        ("holds-the-data", [f"training.output_dir={tmp}"]),
        ("a-file", ["training.output_dir=afile"]),
        ("inside-a-run", [f"training.output_dir={run / 'adapter' / 'x'}"]),
    ]


@pytest.mark.parametrize("case", REFUSED, ids=[c[0] for c in REFUSED])
def test_validate_and_train_refuse_the_same_recipes(tmp_path, monkeypatch, case):
    from peftcli.training.run import train
    from peftcli.validation import validate

    _, files, sections, expected = case
    monkeypatch.chdir(tmp_path)
    path = make(tmp_path, files, **sections)
    loaded = refusal(lambda: load_recipe(path))  # the schema: shared by every command
    if loaded is not None:
        assert expected in loaded
        return
    recipe = load_recipe(path)
    by_validate = refusal(lambda: validate(recipe))
    by_train = refusal(lambda: train(recipe))
    assert by_validate is not None and expected in by_validate, by_validate
    assert by_train == by_validate
    assert not (tmp_path / "run").exists()


def test_validate_refuses_the_folders_train_refuses(tmp_path, monkeypatch):
    from peftcli.training.run import train
    from peftcli.validation import validate

    monkeypatch.chdir(tmp_path)
    path = make(tmp_path, {"train.jsonl": COMPLETION})
    for name, overrides in location_cases(tmp_path):
        recipe = load_recipe(path, overrides)
        by_validate = refusal(lambda recipe=recipe: validate(recipe))
        assert by_validate is not None and "training.output_dir" in by_validate, name
        assert refusal(lambda recipe=recipe: train(recipe)) == by_validate, name


def test_train_runs_each_check_once(tmp_path, monkeypatch):
    """A whole `train` (one step) in this process: the validation pass, the recipe checks, the
    protected paths and the folder's plan run once each."""
    from peftcli import checks, validation
    from peftcli.commands.train import run_train
    from peftcli.run_folder import plan as run_plan
    from peftcli.training import run as training_run

    calls: dict[str, int] = {}

    def counted(owner, name):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)

    counted(validation, "validate")
    counted(checks, "check_recipe")
    counted(run_plan, "protected_paths")
    counted(training_run, "plan_folder")
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": "a\n", "completion": "A"}] * 8)
    recipe = write_recipe(tmp_path / "r.yaml", data={"eval": 0.0}, training={"max_steps": 1})
    assert run_train(recipe, []) == 0
    assert (tmp_path / "run" / "adapter").is_dir()
    assert calls == {"validate": 1, "check_recipe": 1, "protected_paths": 1, "plan_folder": 1}
