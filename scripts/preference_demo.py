"""The preference demo, measured: SFT, then DPO from it; ORPO and SimPO from the base.

For each run: preference accuracy on the 64 held-out pairs (`peftcli eval --json`: the share of
pairs whose `!` answer the model finds likelier than the `.` one), and greedy answers to the 64
held-out prompts — the share ending with `!`, and the share whose word is right.

    python scripts/preference_demo.py          (about 3 minutes on 2 CPU cores; `make demo-preference`)
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEFTCLI = [sys.executable, "-m", "peftcli.cli"]
HELD_OUT = ROOT / "data" / "preference" / "eval.jsonl"
RUNS = [("sft", "SFT (answers end with . three times in four)"), ("dpo", "DPO from the SFT run"),
        ("orpo", "ORPO from the base"), ("simpo", "SimPO from the base")]  # fmt: skip


def peftcli(*args: str) -> str:
    done = subprocess.run([*PEFTCLI, *args], cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"peftcli {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def greedy(run: Path) -> tuple[float, float]:
    """(share of answers ending with !, share whose word is right) over the held-out prompts."""
    from peftcli.console import quiet_libraries
    from peftcli.methods.load import load_adapter
    from peftcli.model.load import load_model, load_tokenizer
    from peftcli.target import open_target
    from peftcli.training.evaluate import generate_answers

    quiet_libraries()
    target = open_target(run)
    tokenizer = load_tokenizer(target.model)
    model = load_adapter(load_model(target.model, device="cpu"), target.adapter)
    rows = [json.loads(line) for line in HELD_OUT.read_text().splitlines()]
    prompts = [
        [tokenizer.bos_token_id, *tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]] for r in rows
    ]
    answers = [a.strip() for a in generate_answers(model, tokenizer, prompts, 12)]
    bang = sum(a.endswith("!") for a in answers) / len(rows)
    right = sum(a.rstrip("!.") == r["chosen"].rstrip("!") for a, r in zip(answers, rows, strict=True)) / len(
        rows
    )
    return bang, right


def main() -> None:
    table = ["| run | steps | seconds | preference accuracy | greedy answers ending with `!` | right word |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for name, what in RUNS:
        started = time.perf_counter()
        peftcli("train", f"recipes/preference/{name}.yaml", "--overwrite")
        seconds = time.perf_counter() - started
        run = ROOT / "runs" / f"pref-{name}"
        extra = ["--data", str(HELD_OUT)] if name == "sft" else []
        accuracy = json.loads(peftcli("eval", str(run), *extra, "--json"))["preference_accuracy"]
        steps = json.loads((run / "eval.json").read_text())["train"]["steps"]
        bang, right = greedy(run)
        table.append(f"| {what} | {steps} | {seconds:.0f} | {accuracy:.2f} | {bang:.2f} | {right:.2f} |")
        print(table[-1], flush=True)
    print("\n".join(table))


if __name__ == "__main__":
    main()
