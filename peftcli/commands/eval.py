"""`peftcli eval`: what to evaluate (run, adapter or model folder), on which data, and the report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peftcli.errors import UserError
from peftcli.recipe import (
    EvalSection,
    TrainingSection,
)
from peftcli.run_folder.layout import Layout
from peftcli.target import eval_split, labels_of, open_target, target_tokenizer
from peftcli.tasks import TASKS


def run_eval(
    path: Path,
    data: Path | None = None,
    compare_base: bool = False,
    trust_remote_code: bool = False,
    harness: str | None = None,
    harness_args: str | None = None,
) -> dict[str, Any]:
    from peftcli.console import quiet_libraries, say
    from peftcli.model.load import load_model
    from peftcli.training.evaluate import evaluate

    if harness_args is not None and harness is None:
        raise UserError("--harness-args needs --harness TASKS")
    if harness is not None and data is not None:
        raise UserError("--harness scores its tasks' own data; --data does not apply to it", "drop --data")
    if harness is not None:
        from peftcli.harness import require_lm_eval, run_harness

        require_lm_eval()  # before the run is opened
        target = open_target(path, trust_remote_code)
        if TASKS[target.model.task].vision:
            raise UserError(
                f"--harness scores text models (lm-eval's hf model); this one is {target.model.task}"
            )
        return run_harness(target, harness, harness_args, compare_base)
    quiet_libraries()
    target = open_target(path, trust_remote_code)
    if compare_base and target.adapter is None:
        raise UserError("--compare-base needs an adapter or a run, not a plain model folder")
    objective = preference_objective_of(target, data)
    if objective is not None:
        return run_preference_eval(target, data, compare_base, objective)
    tokenizer = target_tokenizer(target)
    labels = labels_of(target)
    if labels is None and target.model.task == "seq_cls" and data is not None:
        from peftcli import data as data_stage

        labels = data_stage.scan(str(data), "auto", "seq_cls", "--data").labels
    split = eval_split(target, tokenizer, data, labels)
    training = target.recipe.training if target.recipe else TrainingSection()
    section = target.recipe.eval if target.recipe else EvalSection()
    accelerator = eval_accelerator(training)
    model = load_model(target.model, device=accelerator.device, labels=labels)
    model = accelerator.prepare(model)

    def measure(m: Any, label: str) -> dict[str, Any]:
        say(f"peftcli: evaluating {label} on {len(split.examples)} examples")
        return evaluate(
            m,
            tokenizer,
            split,
            section,
            target.model.task,
            accelerator,
            training.batch_size,
            with_exact_match=True,
        )

    results: dict[str, Any] = {}
    if compare_base:
        results["base"] = measure(model, "the base model")
    if target.adapter is not None:
        from peftcli.methods.load import load_adapter

        model = load_adapter(accelerator.unwrap_model(model), target.adapter)
        model.eval()
        results["adapter"] = measure(model, "the adapter")
    else:
        results["model"] = measure(model, "the model")
    if data is None:
        record(target, results["adapter"])
    return results if compare_base else next(iter(results.values()))


def record(target: Any, metrics: dict[str, Any]) -> None:
    """The run's own eval split: the metrics go into its eval.json (see cards.update_results)."""
    from peftcli.cards import update_results

    update_results(target.run_dir, lambda previous: {**previous, **metrics})


def eval_accelerator(training: TrainingSection) -> Any:
    """An Accelerator for evaluation: the run's precision, no trackers."""
    from peftcli.training.accelerator import make_accelerator

    return make_accelerator(training.model_copy(update={"report_to": ["jsonl"]}), Path("."))


def preference_objective_of(target: Any, data: Path | None) -> str | None:
    """The preference objective to evaluate with: the run's, or, for --data, the one the file's
    columns call for (see objectives.eval_objective); None for the task's evaluation."""
    from peftcli.data.preference import preference_format
    from peftcli.objectives import OBJECTIVES, eval_objective

    trained = OBJECTIVES[target.recipe.training.objective if target.recipe else "sft"]
    if data is None or trained.generates:  # GRPO: --data holds held-out prompts for its rewards
        return None if trained.task_loss else trained.name
    found = eval_objective(trained.name, preference_format(str(data)))
    if found is None and not trained.task_loss:
        raise UserError(f"--data {data}: the run was trained with {trained.name} and this file has no pairs")
    return found


def run_preference_eval(target: Any, data: Path | None, compare_base: bool, name: str) -> dict[str, Any]:
    """Preference metrics (accuracy, reward margins, log-probabilities) on pairs: the run's
    held-out pairs or --data. The reference (DPO, KTO) is the run's starting point — the base,
    or its peft.init_from adapter —, read from the run when it scored this split in training;
    with --compare-base the base is scored against it too."""
    import torch

    from peftcli.console import say
    from peftcli.data import cache, preference, prompts
    from peftcli.data.splits import Split
    from peftcli.methods.load import load_adapter
    from peftcli.model.load import load_model
    from peftcli.objectives import OBJECTIVES
    from peftcli.objectives.build import build_objective
    from peftcli.recipe import DataSection, PreferenceSection

    if target.adapter is None:
        raise UserError("preference evaluation needs an adapter or a run: the reference is its base")
    recipe = target.recipe
    tokenizer = target_tokenizer(target)
    training = recipe.training if recipe else TrainingSection()
    if data is not None and OBJECTIVES[name].generates:
        split = prompts.encode_file(str(data), recipe.data, tokenizer)
    elif data is not None:
        section = recipe.data if recipe else DataSection(train=str(data))
        split = Split(preference.encode_file(str(data), section, tokenizer, name))
    else:
        split = cache.prepare(recipe.data, tokenizer, training.seed, "causal_lm", name).eval
        if split is None:
            raise UserError(
                f"the run's recipe has no eval split (data.eval: {recipe.data.eval})", "pass --data FILE"
            )
    accelerator = eval_accelerator(training)
    model = load_adapter(load_model(target.model, device=accelerator.device), target.adapter)
    model.eval()
    start = recipe.peft.init_from if recipe else None
    settings = recipe.preference if recipe else PreferenceSection()
    grpo = recipe.grpo if recipe else None  # GRPO: the run's rewards
    torch.manual_seed(training.seed)  # as training builds its objective: GRPO samples by the run's seed
    objective = build_objective(
        name, "causal_lm", tokenizer, EvalSection(), settings, start is not None, grpo
    )
    saved = Layout(target.run_dir).reference if target.run_dir and data is None else None
    batch, n = training.batch_size, len(split.examples)
    objective.prepare(model, {"eval": split.examples}, accelerator, batch, saved, start=start, keep=False)
    results: dict[str, Any] = {}
    what = {"preference": "pairs", "unpaired": "answers", "prompts": "prompts"}[OBJECTIVES[name].formats[0]]
    if compare_base:
        say(f"peftcli: evaluating the base model on {n} {what}")
        with model.disable_adapter():
            results["base"] = objective.evaluate(model, split, accelerator, batch)
    say(f"peftcli: evaluating the adapter on {n} {what}")
    results["adapter"] = objective.evaluate(model, split, accelerator, batch)
    if data is None:
        record(target, results["adapter"])
    return results if compare_base else results["adapter"]


def format_result(result: dict[str, Any]) -> str:
    """A human table; with base and adapter side by side when both are there."""
    columns = result if "base" in result else {"value": result}
    metrics = [k for k, v in next(iter(columns.values())).items() if isinstance(v, float)]
    w = max([14] + [len(m) + 2 for m in metrics])
    lines = [
        f"{'metric':<{w}}"
        + "".join(f"{name:>12}" for name in columns)
        + ("      change" if "base" in result else "")
    ]
    for m in metrics:
        values = [columns[c].get(m) for c in columns]
        row = f"{m:<{w}}" + "".join(f"{v:>12.4f}" if v is not None else f"{'-':>12}" for v in values)
        if "base" in result and None not in values:
            row += f"{values[-1] - values[0]:>+12.4f}"
        lines.append(row)
    lines.append(f"{'examples':<{w}}" + "".join(f"{columns[c].get('examples', 0):>12}" for c in columns))
    samples = {c: columns[c].get("samples") for c in columns if columns[c].get("samples")}
    if samples:
        lines.append("")
        lines.append("samples (greedy):")
        first = next(iter(samples.values()))
        for i, s in enumerate(first):
            lines.append(f"  prompt    {s['prompt']!r}")
            lines += [f"  image     {image}" for image in s.get("images", [])]
            lines.append(f"  reference {s['reference']!r}")
            for c, rows in samples.items():
                lines.append(f"  {c:<9} {rows[i]['output']!r}")
    return "\n".join(lines)
