"""Evaluate like the field and share like the Hub (issue #24): `eval --harness` equals
lm-evaluation-harness run directly, every run's card is a Hub model card that huggingface_hub
parses, `push` uploads exactly the run's files (no token in any), and `generate` follows the
run's template.

One tiny run is shared by the module. Its base is a Hub id (`peftcli-test/tiny-llama`) served
from a local Hub cache, offline, with a base card declaring a license, so the card's
`base_model` and `license` come from where they would for a real model.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from .conftest import ROOT, cli, one_error_line, run_cli, write_recipe

TASK_FILE = ROOT / "data" / "harness" / "uppercase.yaml"
TASK = "peftcli_uppercase"
HUB_ID = "peftcli-test/tiny-llama"
FAKE_TOKEN = "hf_peftcliFakeTokenThatMustNeverBeWritten0123"


def hub_cache(root: Path) -> Path:
    """A Hub cache holding HUB_ID (the builtin tiny-llama's files), as `hf download` leaves it."""
    from peftcli.model.builtin import resolve

    cache, commit = root / "hub", "0" * 40
    repo = cache / f"models--{HUB_ID.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(resolve("builtin:tiny-llama"), snapshot)
    (snapshot / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return cache


@pytest.fixture(scope="module")
def shared(tmp_path_factory, peftcli_home):
    root = tmp_path_factory.mktemp("sharing")
    env = {"HF_HUB_CACHE": str(hub_cache(root)), "HF_TOKEN": FAKE_TOKEN}
    lines = (ROOT / "data" / "quickstart" / "train.jsonl").read_text().splitlines()[:96]
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    recipe = write_recipe(
        root / "recipe.yaml",
        model={"name_or_path": HUB_ID},
        data={"train": str(root / "train.jsonl"), "eval": 0.25, "format": "completion"},
        training={"max_steps": 12, "batch_size": 16, "output_dir": str(root / "run")},
    )
    done = {"train": run_cli("train", str(recipe), env=env)}
    done["eval"] = run_cli("eval", str(root / "run"), "--json", env=env)
    harness = ("--harness", str(TASK_FILE), "--compare-base", "--json")
    done["harness"] = run_cli("eval", str(root / "run"), *harness, env=env)
    for name, proc in done.items():
        assert proc.returncode == 0, f"{name}: {proc.stderr[-3000:]}"
    return {"root": root, "run": root / "run", "env": env, **done}


DIRECT = f"""
import json, sys
import lm_eval
from lm_eval.tasks import TaskManager
folder, batch_size, device, *all_args = sys.argv[1:]
out = []
for args in all_args:
    results = lm_eval.simple_evaluate(
        model="hf", model_args=args, tasks=["{TASK}"], batch_size=int(batch_size), device=device,
        log_samples=False,
        task_manager=TaskManager(include_path=folder, include_defaults=False),
    )["results"]["{TASK}"]
    out.append({{"acc": results["acc,none"], "acc_norm": results["acc_norm,none"]}})
print(json.dumps(out))
"""


def test_harness_equals_lm_eval_run_directly(shared):
    """peftcli's numbers are lm-eval's own on the shipped task, with the adapter and with the
    base: `simple_evaluate(model="hf", model_args=...)` with the model_args eval.json records,
    run in a process of its own (the base comes from the module's Hub cache)."""
    pytest.importorskip(
        "lm_eval", reason="lm-eval is the optional `harness` extra (pip install '.[harness]')"
    )
    import subprocess
    import sys

    printed = json.loads(shared["harness"].stdout)
    entry = json.loads((shared["run"] / "eval.json").read_text())["harness"][TASK]
    assert entry["adapter"] == printed["adapter"][TASK] and entry["base"] == printed["base"][TASK]
    config = entry["config"]
    assert config["apply_chat_template"] is False and f"pretrained={HUB_ID}" in config["model_args"]
    assert "hf_model_differs" not in config  # LoRA: lm-eval's own hf model scores it as peftcli does
    adapter_args = config["model_args"]
    base_args = ",".join(p for p in adapter_args.split(",") if not p.startswith("peft="))
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            DIRECT,
            str(TASK_FILE.parent),
            str(config["batch_size"]),
            config["device"],
            adapter_args,
            base_args,
        ],
        capture_output=True,
        text=True,
        cwd=TASK_FILE.parent,  # the task's data_files are relative to its folder
        env={**os.environ, **shared["env"]},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    direct = json.loads(proc.stdout.strip().splitlines()[-1])
    # The same model, tokenizer, requests and batches: the same computation, compared exactly.
    ours = [{k: entry[side][k] for k in ("acc", "acc_norm")} for side in ("adapter", "base")]
    assert ours == direct, (ours, direct)
    assert entry["adapter"]["samples"] == entry["base"]["samples"] == 64
    assert ours[0] != ours[1]  # the adapter changed something lm-eval measures


# test-all: each half is proven in the default suite (the harness's numbers above, compare's table
# in test_compare.py); this is their join, ~20 s of two trainings.
@pytest.mark.slow
def test_compare_tabulates_harness_results(shared):
    """`compare --harness` scores each method's run as `eval --harness` does (its eval.json
    keeps them) and tabulates a column per task and metric; a harness mistake ends before
    anything trains."""
    pytest.importorskip("lm_eval", reason="lm-eval is the optional `harness` extra")
    root, out = shared["root"], shared["root"] / "compare"
    args = ("compare", str(root / "recipe.yaml"), "--methods", "lora,ia3", "--max-steps", "2")
    proc = run_cli(*args, "--output-dir", str(out), "--harness", "no-such-task", env=shared["env"])
    assert proc.returncode == 2 and "unknown lm-eval task `no-such-task`" in one_error_line(proc)
    assert not out.exists()  # refused before any method trained
    harness = ("--harness", str(TASK_FILE), "--harness-args", "limit=16")
    proc = run_cli(*args, "--output-dir", str(out), *harness, "--json", env=shared["env"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout)["rows"]
    for row in rows:
        recorded = json.loads((out / row["method"] / "eval.json").read_text())["harness"][TASK]["adapter"]
        assert row[f"harness:{TASK}:acc"] == recorded["acc"] and recorded["samples"] == 16
    table = (out / "compare.md").read_text()
    assert f"harness:{TASK}:acc_norm" in table.splitlines()[0]
    assert f"harness:{TASK}:acc" in (out / "compare.csv").read_text().splitlines()[0]


def test_run_card_is_a_hub_model_card(shared):
    from huggingface_hub import ModelCard

    card = ModelCard.load(shared["run"] / "adapter" / "README.md")
    meta = card.data.to_dict()
    assert meta["base_model"] == HUB_ID and meta["library_name"] == "peft"
    assert meta["pipeline_tag"] == "text-generation" and meta["license"] == "apache-2.0"
    assert {"peftcli", "lora", "sft"} <= set(meta["tags"]) and "datasets" not in meta  # local data
    body = card.text
    assert f'PeftModel.from_pretrained(base, "{shared["run"].resolve() / "adapter"}")' in body
    assert "## Training" in body and "| optimizer steps | 12 |" in body
    evals = json.loads((shared["run"] / "eval.json").read_text())
    assert f"| loss | {evals['loss']:.4f} |" in body
    assert f"| {TASK} | acc | {evals['harness'][TASK]['base']['acc']:.4f} |" in body
    assert "## Recipe" in body and "name_or_path: peftcli-test/tiny-llama" in body
    assert "Model Card for Model ID" not in body  # PEFT's own card was replaced


def test_card_metadata_for_hub_data_builtin_bases_and_merged_models(tmp_path):
    from huggingface_hub import ModelCard

    from peftcli.cards import write_card

    recipe = {
        "name": "chat",
        "model": {"name_or_path": "builtin:tiny-llama", "task": "causal_lm"},
        "peft": {"method": "adapter"},
        "data": {"train": "HuggingFaceH4/ultrachat_200k:train_sft", "eval": "org/held@main:test"},
        "training": {"objective": "dpo"},
    }
    write_card(tmp_path, kind="merged", recipe=recipe, results={"loss": 1.5})
    card = ModelCard.load(tmp_path / "README.md")
    meta = card.data.to_dict()
    assert meta["library_name"] == "transformers" and "base_model" not in meta  # not a Hub id
    assert meta["datasets"] == ["HuggingFaceH4/ultrachat_200k", "org/held"]
    assert {"adapter", "dpo", "merged"} <= set(meta["tags"]) and "license" not in meta
    assert "AutoModelForCausalLM.from_pretrained(" in card.text and "PeftModel" not in card.text


def test_no_file_of_the_run_holds_the_token(shared):
    """HF_TOKEN was set for train, eval and eval --harness: no file of the run carries it."""
    found = [p for p in shared["run"].rglob("*") if p.is_file() and FAKE_TOKEN.encode() in p.read_bytes()]
    assert not found and (shared["run"] / "adapter" / "README.md").is_file()


class FakeHub:
    """Stands in for HfApi at the network boundary (no upload can run here): records the calls."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def create_commit(self, repo_id, operations, **kwargs):
        self.calls.append(("create_commit", repo_id, operations))
        return f"https://huggingface.co/{repo_id}/commit/0"


def test_push_uploads_the_adapter_its_card_and_the_run_files(shared, monkeypatch, capsys):
    from huggingface_hub import ModelCard

    from peftcli.commands.push import push

    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    hub = FakeHub()
    result = push(shared["run"], "me/quickstart-lora", api=hub)
    (_, repo, options), (_, _, operations) = hub.calls
    assert repo == "me/quickstart-lora" and options["private"] is True
    names = {op.path_in_repo for op in operations}
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer.json"} <= names
    assert {"peftcli/recipe.yaml", "peftcli/eval.json", "peftcli/metrics.jsonl"} <= names
    assert names == set(result["files"]) and not any(n.startswith(".") for n in names)
    contents = {
        op.path_in_repo: op.path_or_fileobj
        if isinstance(op.path_or_fileobj, bytes)
        else Path(op.path_or_fileobj).read_bytes()
        for op in operations
    }
    assert not [n for n, data in contents.items() if FAKE_TOKEN.encode() in data]
    card = contents["README.md"].decode()
    assert 'PeftModel.from_pretrained(base, "me/quickstart-lora")' in card
    assert ModelCard(card).data.to_dict()["base_model"] == HUB_ID
    assert FAKE_TOKEN not in capsys.readouterr().err + json.dumps(result)


def test_push_refusals_in_a_fresh_process(shared, tmp_path):
    no_token = {"HF_TOKEN": "", "HF_HOME": str(tmp_path / "hf-home")}
    line = one_error_line(run_cli("push", str(shared["run"]), "me/x", env=no_token))
    assert "needs a Hugging Face token" in line
    (tmp_path / "folder").mkdir()
    line = one_error_line(run_cli("push", str(tmp_path / "folder"), "me/x", env=shared["env"]))
    assert "is not a finished peftcli run" in line
    line = one_error_line(run_cli("push", str(shared["run"]), "me/x", "--merged", env=shared["env"]))
    assert "peftcli merge" in line
    line = one_error_line(run_cli("push", str(shared["run"]), "not a repo", env=shared["env"]))
    assert "not a Hub repo id" in line
    line = one_error_line(run_cli("push", str(shared["run"]), "me/x", env=shared["env"]))
    assert "HF_HUB_OFFLINE" in line and FAKE_TOKEN not in line


def test_harness_refusals_in_a_fresh_process(shared):
    run = str(shared["run"])
    line = one_error_line(run_cli("eval", run, "--harness", "no_such_task_xyz"))
    assert "unknown lm-eval task `no_such_task_xyz`" in line
    line = one_error_line(run_cli("eval", run, "--harness", "arc_easy"))  # needs the Hub's data
    assert "could not be loaded offline" in line
    line = one_error_line(run_cli("eval", run, "--harness", "nope/missing.yaml"))
    assert "no such task file" in line
    line = one_error_line(run_cli("eval", run, "--harness", str(TASK_FILE), "--harness-args", "shots=2"))
    assert "did you mean" in line or "KEY=VALUE" in line
    # lm-eval missing: a Python where it cannot be imported.
    code = "import sys; sys.modules['lm_eval'] = None; from peftcli.cli import main; sys.argv[0] = 'peftcli'; main()"
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", code, "eval", run, "--harness", str(TASK_FILE)], capture_output=True, text=True
    )
    assert "needs lm-evaluation-harness" in one_error_line(proc)


def test_generate_follows_the_run_template_and_reports_empty_output(tmp_path, capsys, messages_data):
    recipe = write_recipe(
        tmp_path / "chat.yaml", data={"train": str(messages_data), "eval": 0.25, "max_length": 128}
    )
    code, _, err = cli("train", str(recipe), capsys=capsys)
    assert code == 0, err[-3000:]
    run = str(tmp_path / "run")
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["train"]["chat"] is True
    code, out, err = cli("generate", run, "-p", "say cat", "--max-new-tokens", "4", "--json", capsys=capsys)
    assert code == 0 and json.loads(out)["template"] == "chat" and "chat template" in err
    code, out, err = cli(
        "generate", run, "-p", "say cat", "--raw", "--max-new-tokens", "4", "--json", capsys=capsys
    )
    assert code == 0 and json.loads(out)["template"] == "raw" and "plain text (--raw)" in err
    code, _, err = cli("generate", run, "-p", "x", "--chat", "--raw", capsys=capsys)
    assert code == 2 and "contradict" in err

    # A model whose generation config allows only special tokens generates no text.
    from peftcli.model.builtin import resolve

    model = tmp_path / "silent"
    shutil.copytree(resolve("builtin:tiny-llama"), model)
    config = json.loads((model / "generation_config.json").read_text())
    config["suppress_tokens"] = list(range(256))  # every byte token; the specials are 256-260
    (model / "generation_config.json").write_text(json.dumps(config))
    proc = run_cli("generate", str(model), "-p", "hi", "--max-new-tokens", "3", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["output"] == "" and json.loads(proc.stdout)["empty"] is True
    assert "the generation is empty" in proc.stderr
    proc = run_cli("generate", str(model), "-p", "hi", "--max-new-tokens", "3")
    assert "the generation is empty" in proc.stderr


def test_system_message_needs_a_chat_run_or_chat(shared):
    line = one_error_line(
        run_cli("generate", str(shared["run"]), "-p", "x", "--system", "s", env=shared["env"])
    )
    assert "--system needs --chat" in line
