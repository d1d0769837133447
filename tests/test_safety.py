"""Safe with whatever users and strangers hand it (issue #27), through the installed command in
fresh processes: peftcli deletes or overwrites only its own marked outputs, and only with
--overwrite; no Python code from a received folder runs without --trust-remote-code; files
follow the umask; mistakes are exit status 2 and one line; interruptions say what was kept."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from .conftest import PEFTCLI_SCRIPT, ROOT, one_error_line, run_cli

UMASK = 0o027  # not the usual 022: what is written must follow the umask, not a fixed mode


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, byte for byte (and every folder, as empty content)."""
    return {
        str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else b"<dir>")
        for p in sorted(folder.rglob("*"))
    }


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def with_umask(mask: int, fn, *args, **kwargs):
    old = os.umask(mask)  # inherited by the command's process
    try:
        return fn(*args, **kwargs)
    finally:
        os.umask(old)


@pytest.fixture(scope="module")
def space(tmp_path_factory) -> dict:
    """A user's folder: data/train.jsonl, recipe.yaml and one 2-step run, checkpointed at each
    step, trained under UMASK into a fresh PEFTCLI_HOME (so the builtin model is made here too)."""
    root = tmp_path_factory.mktemp("safety")
    home = root / "home"
    lines = (ROOT / "data" / "quickstart" / "train.jsonl").read_text().splitlines()[:32]
    (root / "data").mkdir()
    (root / "data" / "train.jsonl").write_text("\n".join(lines) + "\n")
    recipe = {
        "name": "s",
        "model": {"name_or_path": "builtin:tiny-llama"},
        "peft": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train": str(root / "data" / "train.jsonl"), "eval": 0.0, "max_length": 32},
        "training": {
            "max_steps": 2,
            "batch_size": 8,
            "log_every": 1,
            "save_every": 1,
            "output_dir": str(root / "runs" / "s"),
        },
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    env = {"PEFTCLI_HOME": str(home)}
    proc = with_umask(UMASK, run_cli, "train", "recipe.yaml", cwd=root, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"root": root, "run": root / "runs" / "s", "recipe": root / "recipe.yaml", "env": env}


def cli(space: dict, *args: str):
    return run_cli(*args, cwd=space["root"], env=space["env"])


# --------------------------------------------------------------------------- what may be replaced


def merge_thesis(root: Path) -> tuple[list[str], Path, str]:
    folder = root / "v"
    folder.mkdir(exist_ok=True)
    (folder / "thesis.txt").write_text("precious\n")
    return ["-o", str(folder), "--overwrite"], folder, "is not a folder peftcli made"


def merge_run_data(root: Path) -> tuple[list[str], Path, str]:
    return ["-o", "data", "--overwrite"], root / "data", "which the merge reads"


def merge_working_directory(root: Path) -> tuple[list[str], Path, str]:
    return ["-o", ".", "--overwrite"], root / "data", "working directory"


def merge_into_the_run(root: Path) -> tuple[list[str], Path, str]:
    return ["-o", "runs/s/merged"], root / "runs", "is inside the peftcli run"


def merge_over_the_run(root: Path) -> tuple[list[str], Path, str]:
    return ["-o", "runs/s", "--overwrite"], root / "runs", "which the merge reads"


def merge_over_the_runs_folder(root: Path) -> tuple[list[str], Path, str]:
    return ["-o", "runs", "--overwrite"], root / "runs", "which the merge reads"


MERGE_REFUSALS = [
    merge_thesis,
    merge_run_data,
    merge_working_directory,
    merge_into_the_run,
    merge_over_the_run,
    merge_over_the_runs_folder,
]


@pytest.mark.parametrize("case", MERGE_REFUSALS, ids=[c.__name__ for c in MERGE_REFUSALS])
def test_merge_replaces_no_folder_it_did_not_make(space, case):
    args, watched, expected = case(space["root"])
    before = snapshot(watched)
    proc = cli(space, "merge", str(space["run"]), *args)
    assert expected in one_error_line(proc)
    assert snapshot(watched) == before
    assert not list(space["root"].glob(".*partial*")) and not list(space["root"].glob(".*old*"))


def test_merge_output_is_marked_replaced_only_with_overwrite_and_follows_the_umask(space):
    out = space["root"] / "merged"
    proc = with_umask(UMASK, cli, space, "merge", str(space["run"]), "-o", "merged")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / ".peftcli").read_text())["kind"] == "merge"
    assert mode(out) == 0o777 & ~UMASK
    assert {p.name: mode(p) for p in out.iterdir()} == {p.name: 0o666 & ~UMASK for p in out.iterdir()}
    before = snapshot(out)
    assert "already holds a peftcli merge output" in one_error_line(
        cli(space, "merge", str(space["run"]), "-o", "merged")
    )
    assert snapshot(out) == before
    # train --overwrite replaces runs only: a merged model is not one.
    proc = cli(space, "train", "recipe.yaml", "training.output_dir=merged", "--overwrite")
    assert "is not a peftcli run folder" in one_error_line(proc)
    assert snapshot(out) == before
    proc = cli(space, "merge", str(space["run"]), "-o", "merged", "--overwrite")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "model.safetensors").is_file()
    assert sorted(p.name for p in space["root"].iterdir() if p.name.startswith(".")) == []


def test_train_writes_with_the_umask(space):
    """safetensors writes 0600 and mkdtemp makes 0700; peftcli's files follow the umask."""
    run, home = space["run"], Path(space["env"]["PEFTCLI_HOME"])
    written = [run, *run.rglob("*")]
    builtin = next((home / "builtin").glob("tiny-llama-*"))
    written += [builtin, *builtin.iterdir()]
    assert (run / "adapter" / "adapter_model.safetensors") in written
    assert (run / "checkpoints" / "step-1" / "adapter" / "adapter_model.safetensors") in written
    wrong = {str(p): oct(mode(p)) for p in written if mode(p) != (0o777 if p.is_dir() else 0o666) & ~UMASK}
    assert not wrong


def test_compare_replaces_no_table_it_did_not_make(space):
    root = space["root"]
    mine = root / "mine"
    mine.mkdir()
    (mine / "compare.md").write_text("my own table\n")
    for flags in ([], ["--overwrite"]):
        proc = cli(space, "compare", "recipe.yaml", "--methods", "lora", "--output-dir", "mine", *flags)
        assert "is not a folder peftcli made" in one_error_line(proc)
        assert (mine / "compare.md").read_text() == "my own table\n" and len(list(mine.iterdir())) == 1
    # An earlier compare's folder (marked): its table is replaced only with --overwrite.
    earlier = root / "cmp"
    earlier.mkdir()
    (earlier / ".peftcli").write_text(json.dumps({"kind": "compare"}))
    (earlier / "compare.md").write_text("| method |\n")
    proc = cli(space, "compare", "recipe.yaml", "--methods", "lora", "--output-dir", "cmp")
    assert "already holds a peftcli compare output" in one_error_line(proc) and "--overwrite" in proc.stderr
    assert (earlier / "compare.md").read_text() == "| method |\n"
    proc = cli(space, "compare", "recipe.yaml", "--methods", "lora", "--output-dir", ".", "--overwrite")
    assert "working directory" in one_error_line(proc)


# --------------------------------------------------------------------------- code from a received folder


@pytest.fixture(scope="module")
def received(space) -> dict:
    """A run folder from someone else: its recipe says trust_remote_code: true, and its base is a
    model folder whose auto_map names Python files that leave a mark when they run."""
    root = space["root"]
    run, model = root / "received", root / "their-model"
    shutil.copytree(space["run"], run)
    shutil.copytree(next((Path(space["env"]["PEFTCLI_HOME"]) / "builtin").glob("tiny-llama-*")), model)
    mark = root / "code-ran"
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "conf.C", "AutoModelForCausalLM": "modeling.M"}
    (model / "config.json").write_text(json.dumps(config))
    touch = f"import pathlib\npathlib.Path({str(mark)!r}).write_text('ran')\n"
    (model / "conf.py").write_text(touch + "from transformers import LlamaConfig as C\n")
    (model / "modeling.py").write_text(touch + "from transformers import LlamaForCausalLM as M\n")
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["model"].update(name_or_path=str(model), trust_remote_code=True)
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return {"run": run, "mark": mark}


@pytest.mark.parametrize(
    "command", [["eval"], ["generate", "-p", "hi"], ["merge", "-o", "out-received"]], ids=lambda c: c[0]
)
def test_a_received_run_runs_no_code_without_the_flag(space, received, command):
    before = snapshot(received["run"])
    proc = cli(space, command[0], str(received["run"]), *command[1:])
    line = one_error_line(proc)
    assert "trust_remote_code: true" in line and "--trust-remote-code" in line
    assert not received["mark"].exists()
    assert snapshot(received["run"]) == before and not (space["root"] / "out-received").exists()


def test_the_flag_runs_it(space, received):
    proc = cli(
        space, "generate", str(received["run"]), "-p", "hi", "--max-new-tokens", "2", "--trust-remote-code"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert received["mark"].read_text() == "ran"
    received["mark"].unlink()


# --------------------------------------------------------------------------- one line, not a traceback


def test_generate_seed_out_of_range(space):
    proc = cli(space, "generate", str(space["run"]), "-p", "hi", "--seed", "-1", "--temperature", "1")
    assert "--seed" in one_error_line(proc)


def test_generate_prompt_past_the_learned_positions(space):
    # tiny-gpt2 has 1024 learned positions; its tokenizer makes several tokens of each word.
    long = " ".join(["hello"] * 1100)
    line = one_error_line(cli(space, "generate", "builtin:tiny-gpt2", "-p", long))
    assert "1024 positions" in line and "shorten the prompt" in line


# --------------------------------------------------------------------------- what an interruption kept


def test_ctrl_c_without_checkpoints_says_the_progress_is_lost(space, tmp_path):
    command = [str(PEFTCLI_SCRIPT)] if PEFTCLI_SCRIPT.exists() else [sys.executable, "-m", "peftcli.cli"]
    recipe = yaml.safe_load(space["recipe"].read_text())
    recipe["training"].update(max_steps=10_000, save_every=None, output_dir=str(tmp_path / "run"))
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    err = tmp_path / "err.txt"
    with err.open("w") as stderr:
        proc = subprocess.Popen(
            [*command, "train", "r.yaml"],
            cwd=tmp_path,
            env={**os.environ, **space["env"]},
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 120
        while "step 2/" not in err.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130
    line = [x for x in err.read_text().splitlines() if x.startswith("error:")]
    assert len(line) == 1, err.read_text()[-3000:]
    assert "no checkpoint saved, so its progress is lost" in line[0]
    assert "`peftcli train r.yaml --resume` trains it again from step 0" in line[0]
    assert "training.save_every" in line[0]


def test_a_resumed_run_says_which_steps_its_seconds_cover(space, tmp_path):
    """The shared run, as if killed after step 1: resumed, it trains 1 of its 2 steps."""
    again = tmp_path / "again"
    again.mkdir()
    shutil.copy(space["run"] / ".peftcli", again / ".peftcli")
    shutil.copy(space["run"] / "recipe.yaml", again / "recipe.yaml")
    shutil.copytree(space["run"] / "checkpoints" / "step-1", again / "checkpoints" / "step-1")
    (again / ".incomplete").touch()
    proc = cli(space, "train", "recipe.yaml", f"training.output_dir={again}", "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = next(x for x in proc.stderr.splitlines() if "steps" in x and "eval:" in x)
    assert "2 steps (1 of them in " in summary and "in this session, resumed from step 1)" in summary
