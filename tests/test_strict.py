"""The recipe and the data are strict for real, and whatever a user or a stranger hands peftcli
ends in one line (issue #27): each case runs the installed command in a fresh process, as a
user does, and checks exit status 2, one `error:` line, and the user's files unchanged."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, one_error_line, run_cli, write_jsonl

QUICKSTART = ROOT / "data" / "quickstart" / "train.jsonl"


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def user(tmp_path):
    """A user's folder: a recipe and its data. `refused` runs a command that must be refused and
    returns its one error line, checking that nothing in the folder changed."""
    (tmp_path / "train.jsonl").write_text("\n".join(QUICKSTART.read_text().splitlines()[:16]) + "\n")
    recipe = {
        "name": "t",
        "model": {"name_or_path": "builtin:tiny-llama"},
        "peft": {"method": "lora", "r": 4},
        "data": {"train": "train.jsonl", "eval": 0, "max_length": 48},
        "training": {"max_steps": 1, "batch_size": 4},
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))

    class User:
        folder = tmp_path

        def refused(self, *args: str, recipe: str = "r.yaml", command: str = "validate") -> str:
            before = _digest(tmp_path)
            line = one_error_line(run_cli(command, recipe, *args, cwd=tmp_path))
            assert _digest(tmp_path) == before, "a refused command changed the user's files"
            return line

    return User()


# --------------------------------------------------------------------------- names and paths


@pytest.mark.parametrize("name", ["../../escaped", "/tmp/peftcli-test-abs", ".", "..", "a/b", "", "-x"])
def test_a_name_is_one_folder_name(user, name):
    command = "train" if name.startswith(".") else "validate"
    line = user.refused(f"name={name!r}" if name else "name=''", command=command)
    assert "a run name is one folder name" in line and "letters, digits" in line, line
    assert not (user.folder.parent.parent / "escaped").exists()
    assert not Path("/tmp/peftcli-test-abs").exists()


def test_a_default_name_from_an_odd_file_name_is_made_one(user):
    (user.folder / "my recipe (v2).yaml").write_text(
        (user.folder / "r.yaml").read_text().replace("name: t\n", "")
    )
    from peftcli.recipe_file import load_recipe

    assert load_recipe(user.folder / "my recipe (v2).yaml").name == "my-recipe-v2-"


def test_tilde_is_expanded_once_before_any_check(user, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    proc = run_cli("train", "r.yaml", "training.output_dir=~/x", cwd=user.folder, env={"HOME": str(home)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (home / "x" / "adapter" / "adapter_config.json").is_file()
    assert not (user.folder / "~").exists()
    assert str(home / "x") in (home / "x" / "recipe.yaml").read_text()


@pytest.mark.parametrize("bad", ["a/b/c", "my model", "models/llama/ckpt-500", "org/-name"])
def test_a_model_that_is_neither_folder_nor_hub_id(user, bad):
    for command in ("validate", "estimate", "train") if bad == "a/b/c" else ("validate",):
        line = user.refused(f"model.name_or_path={bad}", command=command)
        assert "not a local folder, and not a hub id" in line, line


def test_a_missing_model_folder(user):
    assert "no such folder: ./nothere" in user.refused("model.name_or_path=./nothere")


# --------------------------------------------------------------------------- strict types


@pytest.mark.parametrize(
    "override, says",
    [
        ("training.batch_size=yes", "`training.batch_size: true` is a boolean; give an integer"),
        ("peft.r=yes", "`peft.r: true` is a boolean; give an integer"),
        ("eval.max_new_tokens=true", "`eval.max_new_tokens: true` is a boolean; give an integer"),
        ("training.gradient_checkpointing='no'", "`training.gradient_checkpointing: 'no'` is a string"),
        ("data.packing=1", "`data.packing: 1` is an integer; give true or false"),
        ("training.lr=true", "`training.lr: true` is a boolean; give a number"),
        ("training.batch_size=2.0", "`training.batch_size: 2.0` is a number; give an integer"),
        ("peft.target_modules=[1]", "is an integer; give a string"),
        ("training.mixed_precision=no", "quote it"),
    ],
)
def test_booleans_are_not_numbers_and_strings_not_booleans(user, override, says):
    assert says in user.refused(override)


def test_all_type_mistakes_are_reported_together(user):
    line = user.refused("training.batch_size=yes", "peft.r=yes", "eval.max_new_tokens=true")
    assert "3 problems" in line and "batch_size" in line and "peft.r" in line and "max_new_tokens" in line


def test_numbers_as_users_write_them(user):
    # An integer is a float (lr: 1), and 1e-4 is a number although YAML 1.1 wants 1.0e-4.
    (user.folder / "n.yaml").write_text((user.folder / "r.yaml").read_text() + "eval:\n  max_new_tokens: 8\n")
    text = (
        (user.folder / "n.yaml")
        .read_text()
        .replace("batch_size: 4", "batch_size: 4\n  lr: 1e-4\n  epochs: 2")
    )
    (user.folder / "n.yaml").write_text(text)
    proc = run_cli("validate", "n.yaml", "training.warmup_ratio=0", "peft.alpha=32", cwd=user.folder)
    assert proc.returncode == 0, proc.stderr
    from peftcli.recipe_file import load_recipe, parse_overrides

    assert load_recipe(user.folder / "n.yaml").training.lr == 1e-4
    assert parse_overrides(["training.lr=3e-3", "peft.r=16"]) == {"training": {"lr": 3e-3}, "peft": {"r": 16}}


def test_a_key_given_twice_in_a_recipe(user):
    text = (user.folder / "r.yaml").read_text() + "training:\n  max_steps: 2\n"
    (user.folder / "twice.yaml").write_text(text)
    line = user.refused(recipe="twice.yaml")
    assert "key `training` appears twice" in line and "line" in line, line
    (user.folder / "twice2.yaml").write_text(
        text.replace("training:\n  max_steps: 2\n", "").replace("r: 4", "r: 4\n  r: 8")
    )
    assert "key `r` appears twice" in user.refused(recipe="twice2.yaml")


# --------------------------------------------------------------------------- peft.options


@pytest.mark.parametrize(
    "override, says",
    [
        ("peft.options.r=8", "peft.options.r is what peft.r sets for lora; set peft.r"),
        ("peft.options.lora_alpha=abc", "peft.options.lora_alpha is what peft.alpha sets"),
        ("peft.options.lora_dropout=0.1", "peft.options.lora_dropout is what peft.dropout sets"),
        (
            "peft.options.target_modules=[q_proj]",
            "peft.options.target_modules is what peft.target_modules sets",
        ),
        (
            "peft.options.fan_in_fan_out=1",
            "`peft.options.fan_in_fan_out: 1` does not fit LoraConfig.fan_in_fan_out, which takes bool",
        ),
        ("peft.options.use_rslora=true", "peft.options.use_rslora is set by peft.rslora"),
        ("peft.options.init_lora_weights=foo", "peft.options.init_lora_weights is set by peft.init"),
        ("peft.init=foo", "unknown initialisation 'foo'"),
        ("peft.method=dora peft.options.use_dora=false", "peft.options.use_dora: dora sets it to True"),
    ],
)
def test_peft_options_are_checked(user, override, says):
    assert says in user.refused(*override.split())


def test_peft_options_of_the_right_type_pass(user):
    proc = run_cli(
        "validate",
        "r.yaml",
        "peft.options.fan_in_fan_out=false",
        "peft.init=pissa_niter_4",
        "peft.rslora=true",
        cwd=user.folder,
    )
    assert proc.returncode == 0, proc.stderr


# --------------------------------------------------------------------------- data rows


def test_a_deeply_nested_row(user):
    deep = "[" * 100_000 + "]" * 100_000
    (user.folder / "deep.jsonl").write_text(
        '{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": ' + deep + "}\n"
    )
    for command in ("validate", "data", "train"):
        line = user.refused("data.train=deep.jsonl", command=command)
        assert f"data.train: {user.folder / 'deep.jsonl'}:2: nested too deeply" in line, line


@pytest.mark.parametrize("ext", ["jsonl", "json"])
def test_a_key_given_twice_in_a_data_row(user, ext):
    rows = '{"prompt": "a", "completion": "b"}', '{"prompt": "a", "completion": "b", "completion": "c"}'
    text = "\n".join(rows) + "\n" if ext == "jsonl" else "[" + ", ".join(rows) + "]"
    (user.folder / f"twice.{ext}").write_text(text)
    line = user.refused(f"data.train=twice.{ext}")
    where = f"{user.folder / 'twice.jsonl'}:2" if ext == "jsonl" else f"{user.folder / 'twice.json'}[1]"
    assert f"data.train: {where}: key `completion` appears twice" in line, line


def test_every_data_message_has_one_prefix(user):
    (user.folder / "bad.jsonl").write_text(
        '{"prompt": "a", "completion": "b"}\n{"prompt": 1, "completion": "b"}\n'
    )
    assert f"error: data.train: {user.folder / 'bad.jsonl'}:2: `prompt` must be a string" in user.refused(
        "data.train=bad.jsonl"
    )
    (user.folder / "broken.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt":\n')
    assert f"error: data.train: {user.folder / 'broken.jsonl'}:2: invalid JSON" in user.refused(
        "data.train=broken.jsonl"
    )


def test_chat_data_without_an_assistant_turn(user):
    write_jsonl(user.folder / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}] * 4)
    for command in ("validate", "train"):
        line = user.refused("data.train=chat.jsonl", command=command)
        assert "no conversation" in line and "has an assistant turn" in line, line


@pytest.mark.parametrize(
    "labels, says",
    [
        ([1, "pos", True], "label 'pos' is a string, but"),
        ([1, True], "label True is a boolean"),
        (["pos"] * 4, "at least 2 classes"),
    ],
)
def test_classification_labels(user, labels, says):
    write_jsonl(user.folder / "cls.jsonl", [{"text": f"t{i}", "label": x} for i, x in enumerate(labels)])
    args = ("data.train=cls.jsonl", "model.name_or_path=builtin:tiny-bert", "model.task=seq_cls")
    assert says in user.refused(*args)


# --------------------------------------------------------------------------- peft.init_from


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """A finished LoRA run (r=16, alpha=32) with a checkpoint; and the shape of a BERT
    classifier's run (its recipe.yaml, adapter_config.json and base model config: what the
    checks read; no weights)."""
    folder = tmp_path_factory.mktemp("runs")
    (folder / "train.jsonl").write_text("\n".join(QUICKSTART.read_text().splitlines()[:16]) + "\n")
    recipe = {
        "name": "sft",
        "model": {"name_or_path": "builtin:tiny-llama"},
        "peft": {"method": "lora", "r": 16, "alpha": 32},
        "data": {"train": "train.jsonl", "eval": 0, "max_length": 48},
        "training": {"max_steps": 2, "batch_size": 4, "save_every": 1, "output_dir": "sft"},
    }
    (folder / "sft.yaml").write_text(yaml.safe_dump(recipe))
    proc = run_cli("train", "sft.yaml", cwd=folder)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (folder / "bert-base").mkdir()
    (folder / "bert-base" / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
    (folder / "bert" / "adapter").mkdir(parents=True)
    (folder / "bert" / "recipe.yaml").write_text(
        yaml.safe_dump({"model": {"name_or_path": "builtin:tiny-bert"}})
    )
    (folder / "bert" / "adapter" / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "task_type": "SEQ_CLS",
                "base_model_name_or_path": str(folder / "bert-base"),
                "r": 4,
                "lora_alpha": 8,
                "target_modules": ["query", "value"],
            }
        )
    )
    return folder


def _init_recipe(user, run: Path, **peft) -> None:
    recipe = yaml.safe_load((user.folder / "r.yaml").read_text())
    recipe["peft"] = {"method": "lora", "init_from": str(run), **peft}
    (user.folder / "init.yaml").write_text(yaml.safe_dump(recipe))


def test_init_from_settings_that_differ_are_refused_naming_both(user, sft_run):
    _init_recipe(user, sft_run / "sft", r=64)
    line = user.refused(recipe="init.yaml")
    assert "peft.r: 64 (the adapter has r=16)" in line, line


def test_init_from_makes_the_record_true_and_says_so(user, sft_run):
    _init_recipe(user, sft_run / "sft" / "checkpoints" / "step-1")
    proc = run_cli("train", "init.yaml", "training.output_dir=out", cwd=user.folder)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "peftcli: note: peft: starts from the lora adapter in" in proc.stderr
    assert "with its settings (r=16, alpha=32" in proc.stderr
    recorded = yaml.safe_load((user.folder / "out" / "recipe.yaml").read_text())["peft"]
    adapter = json.loads((user.folder / "out" / "adapter" / "adapter_config.json").read_text())
    assert (recorded["r"], recorded["alpha"]) == (adapter["r"], adapter["lora_alpha"]) == (16, 32)
    assert sorted(recorded["target_modules"]) == sorted(adapter["target_modules"])


def test_init_from_a_missing_checkpoint_names_the_ones_there(user, sft_run):
    _init_recipe(user, sft_run / "sft" / "checkpoints" / "step-9")
    line = user.refused(recipe="init.yaml")
    assert "no such run, checkpoint or adapter folder" in line and "step-1" in line, line


def test_init_from_another_model_names_what_it_was_trained_on(user, sft_run):
    _init_recipe(user, sft_run / "bert")
    line = user.refused(recipe="init.yaml", command="train")
    assert "was trained for seq_cls on builtin:tiny-bert" in line, line
    write_jsonl(
        user.folder / "cls.jsonl", [{"text": f"a {i}", "label": ["pos", "neg"][i % 2]} for i in range(8)]
    )
    line = user.refused("model.task=seq_cls", "data.train=cls.jsonl", recipe="init.yaml")
    assert "was trained on builtin:tiny-bert (model_type bert)" in line and "builtin:tiny-llama" in line, line


def test_a_run_recorded_before_the_record_was_true_still_opens(user, sft_run):
    """An older peftcli recorded the recipe's r for a run started from an r=16 adapter; such a
    run still evaluates, its settings read from the adapter (what the run really is)."""
    import shutil

    old = user.folder / "old-dpo"
    shutil.copytree(sft_run / "sft", old)
    recorded = yaml.safe_load((old / "recipe.yaml").read_text())
    recorded["peft"].update(r=64, init_from=str(sft_run / "sft"))
    (old / "recipe.yaml").write_text(yaml.safe_dump(recorded))
    proc = run_cli("eval", str(old), "--data", str(sft_run / "train.jsonl"), "--json", cwd=user.folder)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["loss"] > 0
