"""`peftcli eval --harness`: EleutherAI's lm-evaluation-harness on a run's model.

The model is the one peftcli's own `eval` scores: the base loaded as the run loaded it (dtype,
quantization, device), the adapter put on it through peftcli's one loader, and the tokenizer the
run saved (with its chat template). lm-eval gets it as an `HFLM` instance, so its numbers are
what `lm_eval.simple_evaluate(model="hf", model_args="pretrained=BASE,peft=ADAPTER,...")` gives
on the same task (tested); `eval.json` records those model_args so anyone can check.

A task is an lm-eval task name (`hellaswag`), or the path of a task YAML (such as the shipped
`data/harness/uppercase.yaml`); its relative `data_files` are looked up from the working
directory, then from the YAML's folder, as a recipe's data paths are.

lm-eval is an optional extra (`pip install 'peftcli[harness]'`); it is imported only here.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any

from peftcli.errors import UserError, did_you_mean

INSTALL = "pip install 'peftcli[harness]' (lm-eval 0.4.13)"
# --harness-args keys, each passed to lm_eval.simple_evaluate, with the type it parses to.
ARGS: dict[str, type] = {
    "num_fewshot": int,
    "limit": float,
    "batch_size": int,
    "bootstrap_iters": int,
    "apply_chat_template": bool,
    "fewshot_as_multiturn": bool,
    "system_instruction": str,
    "random_seed": int,
}


def require_lm_eval() -> str:
    """lm-eval's version; refuses, in one line, when it is not installed."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError("--harness needs lm-evaluation-harness, which is not installed", INSTALL) from None
    from importlib.metadata import version

    return version("lm_eval")


def parse_args(text: str | None) -> dict[str, Any]:
    """`--harness-args num_fewshot=5,limit=100` -> keyword arguments of simple_evaluate."""
    parsed: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in (text or "").split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in ARGS:
            known = ", ".join(ARGS)
            raise UserError(
                f"--harness-args: `{item}` is not KEY=VALUE with KEY one of {known}{did_you_mean(key, ARGS)}"
            )
        kind = ARGS[key]
        try:
            if kind is bool:
                if value.lower() not in ("true", "false"):
                    raise ValueError(value)
                parsed[key] = value.lower() == "true"
            else:
                parsed[key] = kind(value)
        except ValueError:
            raise UserError(f"--harness-args: {key}={value} is not a {kind.__name__}") from None
    return parsed


def task_specs(tasks: str) -> list[str | dict[str, Any]]:
    """Task names stay names; task YAML files become their config, data paths made absolute."""
    specs: list[str | dict[str, Any]] = []
    for name in filter(None, (t.strip() for t in tasks.split(","))):
        path = Path(name).expanduser()
        if path.suffix in (".yaml", ".yml") or os.sep in name:
            if not path.is_file():
                raise UserError(f"--harness: no such task file: {name}")
            specs.append(file_config(path))
        else:
            specs.append(name)
    if not specs:
        raise UserError("--harness needs a task", "e.g. --harness data/harness/uppercase.yaml or hellaswag")
    return specs


def file_config(path: Path) -> dict[str, Any]:
    from lm_eval.tasks._yaml_loader import load_yaml

    try:
        config = load_yaml(path, resolve_func=True)
    except Exception as exc:  # a YAML error, a bad include or !function: the file's problem
        raise UserError(f"--harness: cannot read task file {path}: {exc}") from None
    if "task" not in config:
        raise UserError(f"--harness: {path} defines no `task` (groups are given by name)")
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    if files is not None:
        config["dataset_kwargs"] = {**config["dataset_kwargs"], "data_files": _absolute(files, path.parent)}
    return config


def _absolute(files: Any, folder: Path) -> Any:
    if isinstance(files, dict):
        return {k: _absolute(v, folder) for k, v in files.items()}
    if isinstance(files, list):
        return [_absolute(v, folder) for v in files]
    here = Path(str(files)).expanduser()
    if here.is_absolute() or here.exists() or not (folder / here).exists():
        return str(here)
    return str((folder / here).resolve())


def task_manager(specs: list[str | dict[str, Any]]) -> Any:
    """lm-eval's TaskManager: its own tasks indexed only when a name asks for one (5 s)."""
    from lm_eval.tasks import TaskManager

    names = [s for s in specs if isinstance(s, str)]
    manager = TaskManager(include_defaults=bool(names))
    unknown = [n for n in names if not manager.match_tasks([n])]
    if unknown:
        raise UserError(
            f"--harness: unknown lm-eval task `{unknown[0]}`{did_you_mean(unknown[0], manager.all_tasks)}",
            "`lm_eval ls tasks` lists them; a task file is given by its path",
        )
    return manager


def load_tasks(manager: Any, specs: list[str | dict[str, Any]]) -> None:
    """Build the tasks once before any model loads: a dataset that needs the network while
    offline, or a broken task, is refused in one line."""
    for spec in specs:
        name = spec if isinstance(spec, str) else spec["task"]
        try:
            with quiet():
                manager.load([spec])
        except Exception as exc:
            offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
            where = (spec.get("dataset_path") if isinstance(spec, dict) else None) or name
            if offline:
                raise UserError(
                    f"--harness {name}: its data ({where}) could not be loaded offline (HF_HUB_OFFLINE=1): "
                    f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                    "download it once while online, or use a local task file",
                ) from None
            raise UserError(
                f"--harness {name}: lm-eval could not load it: {type(exc).__name__}: {str(exc)[:300]}"
            ) from None


@contextlib.contextmanager
def quiet():
    """lm-eval and datasets print progress; stdout stays for `--json`'s one document."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def metrics_of(output: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """lm-eval's `results` as {task: {metric: value, ..., "samples": n}} (filter `none` dropped)."""
    found: dict[str, dict[str, Any]] = {}
    samples = output.get("n-samples") or {}
    for task, values in output["results"].items():
        row: dict[str, Any] = {}
        for key, value in values.items():
            metric, _, filter_ = key.partition(",")
            if not filter_ or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            row[metric if filter_ == "none" else key] = float(value)
        if task in samples:
            row["samples"] = samples[task].get("effective")
        found[task] = row
    return found


def model_args(target: Any, model: Any) -> str:
    """The `--model_args` that make `lm-eval run --model hf` load the same model (with `--device`
    and `--batch_size` as recorded beside them)."""
    from peftcli.model.load import source

    parts = [f"pretrained={source(target.model)}"]
    if target.adapter is not None:
        parts += [f"peft={target.adapter}", f"tokenizer={target.adapter}"]
    dtype = str(getattr(model, "dtype", next(model.parameters()).dtype)).removeprefix("torch.")
    return ",".join([*parts, f"dtype={dtype}"])


def evaluate(
    model: Any, tokenizer: Any, specs: list, manager: Any, options: dict[str, Any], task: str
) -> dict:
    """One model through lm_eval.simple_evaluate, as lm-eval's own `hf` model would run it, but
    with prompt-learning adapters sampled as trained (harness_lm.TrainedLM)."""
    import lm_eval

    from peftcli.harness_lm import TrainedLM

    options = dict(options)
    backend = "seq2seq" if task == "seq2seq_lm" else "causal"
    with quiet():
        lm = TrainedLM(
            pretrained=model, tokenizer=tokenizer, backend=backend, batch_size=options.pop("batch_size")
        )
        output = lm_eval.simple_evaluate(
            model=lm, tasks=specs, task_manager=manager, log_samples=False, **options
        )
    return metrics_of(output)


def check_harness(tasks: str, args: str | None = None) -> None:
    """What `run_harness` would refuse before loading a model: lm-eval missing, its arguments,
    its tasks (unknown, or data that cannot be had offline)."""
    require_lm_eval()
    parse_args(args)
    specs = task_specs(tasks)
    load_tasks(task_manager(specs), specs)


def run_harness(
    target: Any, tasks: str, args: str | None = None, compare_base: bool = False
) -> dict[str, Any]:
    """lm-eval's metrics per task: `{task: {metric: value}}`, or with `compare_base`
    `{"base": {...}, "adapter": {...}}`. A run's eval.json keeps them under `harness`."""
    import torch

    from peftcli.console import quiet_libraries, say
    from peftcli.model.load import load_model
    from peftcli.rendering import run_is_chat
    from peftcli.target import target_tokenizer

    version = require_lm_eval()
    quiet_libraries()
    if target.model.task == "seq_cls":
        raise UserError("--harness scores language models; a classifier (seq_cls) has no next-token head")
    if compare_base and target.adapter is None:
        raise UserError("--compare-base needs an adapter or a run, not a plain model folder")
    options = {"batch_size": target.recipe.training.batch_size if target.recipe else 8}
    options["apply_chat_template"] = run_is_chat(target)
    options.update(parse_args(args))
    specs = task_specs(tasks)
    manager = task_manager(specs)
    load_tasks(manager, specs)

    tokenizer = target_tokenizer(target)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(target.model, device=device)
    if target.model.quantization == "none":
        model.to(device)
    model.eval()
    template = "with the run's chat template" if options["apply_chat_template"] else "without a chat template"
    results: dict[str, Any] = {}
    if compare_base:
        say(f"peftcli: lm-eval {version}: the base model on {tasks}, {template}")
        results["base"] = evaluate(model, tokenizer, specs, manager, options, target.model.task)
    if target.adapter is not None:
        from peftcli.methods.load import load_adapter

        model = load_adapter(model, target.adapter).eval()
    say(f"peftcli: lm-eval {version}: the {'adapter' if target.adapter else 'model'} on {tasks}, {template}")
    results["adapter"] = evaluate(model, tokenizer, specs, manager, options, target.model.task)
    config = {"lm_eval": version, "model_args": model_args(target, model), "device": str(device), **options}
    from peftcli.harness_lm import hf_model_caveat

    if caveat := hf_model_caveat(model):  # prompt learning: lm-eval's hf model samples it otherwise
        config["hf_model_differs"] = caveat
    record(target, results, config)
    return results if compare_base else results["adapter"]


def record(target: Any, results: dict[str, Any], config: dict[str, Any]) -> None:
    """A run's eval.json keeps each task under `harness`: the adapter's metrics, the base's
    (with --compare-base) and how lm-eval ran; other tasks measured before are kept."""
    from peftcli.cards import update_results

    def change(previous: dict[str, Any]) -> dict[str, Any]:
        harness = dict(previous.get("harness") or {})
        for task, metrics in results["adapter"].items():
            harness[task] = {"adapter": metrics, "config": config}
            if "base" in results and task in results["base"]:
                harness[task]["base"] = results["base"][task]
        return {**previous, "harness": harness}

    update_results(target.run_dir, change)


def format_result(result: dict[str, Any]) -> str:
    """task / metric / value (base, adapter and the change with --compare-base)."""
    columns = result if "base" in result else {"value": result}
    tasks = list(next(reversed(columns.values())))
    lines = ["task".ljust(24) + "metric".ljust(14) + "".join(f"{c:>12}" for c in columns)]
    if "base" in result:
        lines[0] += f"{'change':>12}"
    for task in tasks:
        metrics = next(reversed(columns.values()))[task]
        for metric in metrics:
            values = [columns[c].get(task, {}).get(metric) for c in columns]
            cells = "".join(f"{v:>12.4f}" if isinstance(v, float) else f"{v!s:>12}" for v in values)
            row = task[:23].ljust(24) + metric[:13].ljust(14) + cells
            if "base" in result and all(isinstance(v, float) for v in values):
                row += f"{values[-1] - values[0]:>+12.4f}"
            lines.append(row)
    return "\n".join(lines)
