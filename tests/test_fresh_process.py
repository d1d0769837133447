"""Every method through every command, each in a fresh process, as a user runs them:
`train` (a few steps) → `eval` → `generate` → `merge`, with the installed console script.

In-process tests share imports and registrations (peftcli's own tuners, for one), so they can
pass where a user's fresh `peftcli eval` fails. Here each command starts from nothing; it ends
with exit 0 or, where the method cannot do it, one `error:` line and exit 2 — never a traceback.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from peftcli.methods import METHODS

from .conftest import one_error_line, run_cli, write_jsonl, write_recipe

WORDS = [f"{a}{b}{c}" for a in "abcd" for b in "efg" for c in "hi"][:16]


def pipeline(root: Path, method: str) -> dict[str, object]:
    """Run the four commands for one method; returns each CompletedProcess by command."""
    recipe = write_recipe(
        root / f"{method}.yaml",
        peft={"method": method},
        data={"train": str(root / "train.jsonl"), "eval": 0.25},
        training={"max_steps": 2, "batch_size": 8, "output_dir": str(root / method)},
        eval={"metrics": ["loss"]},
    )
    run = str(root / method)
    done: dict[str, object] = {"train": run_cli("train", str(recipe))}
    if done["train"].returncode != 0:
        return done
    done["eval"] = run_cli("eval", run, "--json")
    done["generate"] = run_cli("generate", run, "--prompt", "Up: abc\n", "--max-new-tokens", "3", "--json")
    done["merge"] = run_cli("merge", run, "-o", str(root / f"{method}-merged"))
    return done


@pytest.fixture(scope="module")
def results(tmp_path_factory, request) -> dict[str, dict[str, object]]:
    """The selected methods' pipelines, run before their tests, two at a time."""
    selected = [
        item.callspec.params["method"]
        for item in request.session.items
        if item.originalname == "test_every_command_in_a_fresh_process"
    ]
    root = tmp_path_factory.mktemp("fresh")
    write_jsonl(root / "train.jsonl", [{"prompt": f"Up: {w}\n", "completion": w.upper()} for w in WORDS])
    # Two at a time: one per core (each process runs one torch thread).
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {m: pool.submit(pipeline, root, m) for m in selected}
    return {m: f.result() for m, f in futures.items()}


# A fresh process spends ~7 s of CPU importing torch, transformers and PEFT: the default suite
# runs one method of each kind (LoRA merges; `adapter` is peftcli's own tuner, registered with
# PEFT; prompt tuning does not merge), `make test-all` runs them all.
QUICK = {"lora", "adapter", "prompt-tuning"}


@pytest.mark.parametrize(
    "method", [m if m in QUICK else pytest.param(m, marks=pytest.mark.slow) for m in METHODS]
)
def test_every_command_in_a_fresh_process(results, method):
    done = results[method]
    for command, proc in done.items():
        assert "Traceback" not in proc.stderr, f"{command}: {proc.stderr[-3000:]}"
    train = done["train"]
    assert train.returncode == 0, train.stderr[-3000:]
    assert done["eval"].returncode == 0, done["eval"].stderr[-3000:]
    assert json.loads(done["eval"].stdout)["loss"] > 0
    generated = done["generate"]
    assert generated.returncode == 0, generated.stderr[-3000:]
    assert isinstance(json.loads(generated.stdout), dict)
    merged = done["merge"]
    if METHODS[method].merges:
        assert merged.returncode == 0, merged.stderr[-3000:]
    else:
        assert method in one_error_line(merged)
