"""`peftcli eval`: what to evaluate (run, adapter or model folder), on which data, and the report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from peftcli.errors import UserError
from peftcli.recipe import (
    EvalSection,
    TrainingSection,
)
from peftcli.runs import labels_of, open_target
from peftcli.training.evaluate import eval_split


def run_eval(path: Path, data: Path | None = None, compare_base: bool = False) -> dict[str, Any]:
    from peftcli.console import quiet_libraries, say
    from peftcli.model.load import load_model, load_tokenizer
    from peftcli.training.accelerator import make_accelerator
    from peftcli.training.evaluate import evaluate

    quiet_libraries()
    target = open_target(path)
    if compare_base and target.adapter is None:
        raise UserError("--compare-base needs an adapter or a run, not a plain model folder")
    tokenizer_section = (
        target.model.model_copy(update={"name_or_path": str(target.adapter)})
        if target.adapter and (target.adapter / "tokenizer_config.json").is_file()
        else target.model
    )
    tokenizer = load_tokenizer(tokenizer_section)
    labels = labels_of(target)
    if labels is None and target.model.task == "seq_cls" and data is not None:
        from peftcli import data as data_stage

        labels = data_stage.scan(str(data), "auto", "seq_cls", "--data").labels
    split = eval_split(target, tokenizer, data, labels)
    training = target.recipe.training if target.recipe else TrainingSection()
    section = target.recipe.eval if target.recipe else EvalSection()
    accelerator = make_accelerator(training.model_copy(update={"report_to": ["jsonl"]}), Path("."))
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
    if target.run_dir is not None and data is None:
        eval_file = target.run_dir / "eval.json"
        previous = json.loads(eval_file.read_text()) if eval_file.is_file() else {}
        eval_file.write_text(json.dumps({**previous, **results["adapter"]}, indent=2) + "\n")
    return results if compare_base else next(iter(results.values()))


def format_result(result: dict[str, Any]) -> str:
    """A human table; with base and adapter side by side when both are there."""
    columns = result if "base" in result else {"value": result}
    metrics = [k for k, v in next(iter(columns.values())).items() if isinstance(v, float)]
    lines = [
        f"{'metric':<14}"
        + "".join(f"{name:>12}" for name in columns)
        + ("      change" if "base" in result else "")
    ]
    for m in metrics:
        values = [columns[c].get(m) for c in columns]
        row = f"{m:<14}" + "".join(f"{v:>12.4f}" if v is not None else f"{'-':>12}" for v in values)
        if "base" in result and None not in values:
            row += f"{values[-1] - values[0]:>+12.4f}"
        lines.append(row)
    lines.append(f"{'examples':<14}" + "".join(f"{columns[c].get('examples', 0):>12}" for c in columns))
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
