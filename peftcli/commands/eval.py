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
        return run_harness(open_target(path, trust_remote_code), harness, harness_args, compare_base)
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
    columns call for (pairs: dpo's metrics against the base); None for SFT evaluation."""
    from peftcli.data import preference

    trained = target.recipe.training.objective if target.recipe else "sft"
    if data is None:
        return None if trained == "sft" else trained
    found = preference.is_preference_file(str(data))
    if found is None:
        if trained != "sft":
            raise UserError(f"--data {data}: the run was trained with {trained} and this file has no pairs")
        return None
    if trained != "sft" and (found == "kto") == (trained == "kto"):
        return trained
    return found


def run_preference_eval(target: Any, data: Path | None, compare_base: bool, name: str) -> dict[str, Any]:
    """Preference metrics (accuracy, reward margins, log-probabilities) on pairs: the run's
    held-out pairs or --data. The reference (DPO, KTO) is the run's starting point — the base,
    or its peft.init_from adapter; with --compare-base the base is scored against it too."""

    from peftcli.console import say
    from peftcli.data import cache, preference
    from peftcli.methods.load import adapter_folder, load_adapter
    from peftcli.model.load import load_model
    from peftcli.objectives import OBJECTIVES
    from peftcli.recipe import DataSection, PreferenceSection
    from peftcli.training import preference as objectives

    if target.adapter is None:
        raise UserError("preference evaluation needs an adapter or a run: the reference is its base")
    recipe = target.recipe
    tokenizer = target_tokenizer(target)
    training = recipe.training if recipe else TrainingSection()
    if data is not None:
        section = recipe.data if recipe else DataSection(train=str(data))
        examples = preference.encode_file(str(data), section, tokenizer, name)
    else:
        prepared = cache.prepare(recipe.data, tokenizer, training.seed, "causal_lm", name)
        if prepared.eval is None:
            raise UserError(
                f"the run's recipe has no eval split (data.eval: {recipe.data.eval})", "pass --data FILE"
            )
        examples = prepared.eval.examples
    accelerator = eval_accelerator(training)
    model = load_adapter(load_model(target.model, device=accelerator.device), target.adapter)
    model.eval()
    objective = objectives.Objective(name, recipe.preference if recipe else PreferenceSection())
    pad, batch = tokenizer.pad_token_id, training.batch_size
    if OBJECTIVES[name].reference:
        start = recipe.peft.init_from if recipe else None
        saved = Layout(target.run_dir).reference if target.run_dir and data is None else None
        if saved is not None and saved.is_file():
            from safetensors.torch import load_file

            table = load_file(saved).get("eval")
        else:
            table = None
        if table is None or len(table) != len(examples):
            if start:
                load_adapter(model, adapter_folder(start), adapter_name="reference")
                model.set_adapter("reference")
            table = objectives.reference_table(
                objective, model, examples, batch, pad, accelerator, adapter=bool(start)
            )
            if start:
                model.set_adapter("default")
                model.delete_adapter("reference")
        objective.reference = {"eval": table}
    results: dict[str, Any] = {}
    what = "pairs" if objective.paired else "answers"
    if compare_base:
        say(f"peftcli: evaluating the base model on {len(examples)} {what}")
        with model.disable_adapter():
            results["base"] = objectives.evaluate(model, examples, objective, accelerator, batch, pad)
        results["base"]["examples"] = len(examples)
    say(f"peftcli: evaluating the adapter on {len(examples)} {what}")
    results["adapter"] = objectives.evaluate(model, examples, objective, accelerator, batch, pad)
    results["adapter"]["examples"] = len(examples)
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
            lines.append(f"  reference {s['reference']!r}")
            for c, rows in samples.items():
                lines.append(f"  {c:<9} {rows[i]['output']!r}")
    return "\n".join(lines)
