"""`peftcli eval`: what to evaluate (run, adapter or model folder), on which data, and the report."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import builtin
from .errors import UserError
from .recipe import DataSection, EvalSection, ModelSection, Recipe, TrainingSection, load_recipe, read_yaml

_TASKS = {"CAUSAL_LM": "causal_lm", "SEQ_2_SEQ_LM": "seq2seq_lm", "SEQ_CLS": "seq_cls"}


@dataclass
class Target:
    model: ModelSection
    adapter: Path | None
    recipe: Recipe | None  # set when the target is (inside) a run folder
    run_dir: Path | None


def open_target(path: Path) -> Target:
    """A run folder, an adapter folder (PEFT save_pretrained), a plain model folder, or a
    builtin model (`builtin:<name>`, as in a recipe's model.name_or_path)."""
    spec = str(path)
    path = path.expanduser()
    if not path.exists() and spec.startswith(builtin.PREFIX):
        folder = Path(builtin.resolve(spec, key=""))
        return Target(ModelSection(name_or_path=spec, task=_model_task(folder)), None, None, None)
    if not path.exists():
        raise UserError(f"no such run, adapter or model folder: {path}")
    if (path / "recipe.yaml").is_file() and (path / "adapter" / "adapter_config.json").is_file():
        recipe = load_recipe(path / "recipe.yaml", _recorded_default_metrics(path / "recipe.yaml"))
        return Target(recipe.model, path / "adapter", recipe, path)
    if (path / "adapter_config.json").is_file():
        if (path.parent / "recipe.yaml").is_file():
            return open_target(path.parent)
        cfg = json.loads((path / "adapter_config.json").read_text())
        base = cfg.get("base_model_name_or_path")
        if not base:
            raise UserError(f"{path}/adapter_config.json names no base model (base_model_name_or_path)")
        task = _TASKS.get(cfg.get("task_type") or "CAUSAL_LM", "causal_lm")
        return Target(ModelSection(name_or_path=base, task=task), path, None, None)
    if (path / "config.json").is_file():
        return Target(ModelSection(name_or_path=str(path), task=_model_task(path)), None, None, None)
    if (path / "recipe.yaml").is_file():
        raise UserError(f"{path} holds no adapter yet: the run did not finish", "train it again, or --resume")
    raise UserError(
        f"{path} is not a run, adapter or model folder",
        "expected recipe.yaml + adapter/, adapter_config.json, or config.json",
    )


def _recorded_default_metrics(path: Path) -> list[str]:
    """Runs recorded before eval.metrics depended on the task hold the old default,
    [loss, perplexity], for classifiers too: read it as the task's default."""
    raw = read_yaml(path)
    task = (raw.get("model") or {}).get("task")
    if task == "seq_cls" and (raw.get("eval") or {}).get("metrics") == ["loss", "perplexity"]:
        return ["eval.metrics=null"]
    return []


def _model_task(path: Path) -> str:
    """The task a plain model folder was saved for (a merged run keeps its head; an encoder
    without one, such as builtin:tiny-bert, is for classification)."""
    from .checks import ENCODER_ONLY

    config = json.loads((path / "config.json").read_text())
    if _is_classifier(config) or config.get("model_type") in ENCODER_ONLY:
        return "seq_cls"
    return "seq2seq_lm" if config.get("is_encoder_decoder") else "causal_lm"


def _is_classifier(config: dict[str, Any]) -> bool:
    return any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or [])


def labels_of(target: Target) -> list[str] | None:
    """Class names in the order of the classifier's outputs: the run's labels.json, or the
    id2label of a (merged) classifier folder; None when the target has none."""
    from .model import source
    from .run import LABELS_FILE

    if target.adapter is not None:
        path = target.adapter / LABELS_FILE
        return json.loads(path.read_text()) if path.is_file() else None
    if target.model.task != "seq_cls":
        return None
    config = json.loads((Path(source(target.model)) / "config.json").read_text())
    id2label = config.get("id2label")
    if not _is_classifier(config) or not id2label:
        return None  # a base encoder: its head is new, its classes come from the data
    return [id2label[k] for k in sorted(id2label, key=int)]


def eval_split(target: Target, tokenizer: Any, data: Path | None, labels: list[str] | None) -> Any:
    from . import data as data_stage

    task = target.model.task
    if data is not None:
        section = target.recipe.data if target.recipe else DataSection(train=str(data))
        return data_stage.prepare_file(str(data), section, tokenizer, task, labels)
    if target.recipe is None:
        raise UserError("this target has no recipe to take eval data from", "pass --data FILE")
    prepared = data_stage.prepare(target.recipe.data, tokenizer, target.recipe.training.seed, task)
    if prepared.eval is None:
        raise UserError(
            f"the run's recipe has no eval split (data.eval: {target.recipe.data.eval})", "pass --data FILE"
        )
    return prepared.eval


def run_eval(path: Path, data: Path | None = None, compare_base: bool = False) -> dict[str, Any]:
    from .evaluate import evaluate
    from .model import load_model, load_tokenizer, quiet_libraries
    from .run import make_accelerator, say

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
        from . import data as data_stage

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
        from .methods import load_adapter

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
