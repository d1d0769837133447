"""What `eval`, `generate` and `merge` are pointed at: a run folder, an adapter folder, a plain
model folder or a builtin model, opened into one `Target` (the model section to load, the
adapter, the run's recorded recipe, the run folder)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftcli.errors import UserError
from peftcli.model import builtin
from peftcli.recipe import ModelSection, Recipe
from peftcli.run_folder.layout import LABELS, Layout, adapter_file, has_adapter
from peftcli.tasks import ENCODER_ONLY, task_of_peft_type


def _recorded_default_metrics(path: Path) -> list[str]:
    """Runs recorded before eval.metrics depended on the task hold the old default,
    [loss, perplexity], for classifiers too: read it as the task's default."""
    from peftcli.recipe_file import read_yaml

    raw = read_yaml(path)
    task = (raw.get("model") or {}).get("task")
    if task == "seq_cls" and (raw.get("eval") or {}).get("metrics") == ["loss", "perplexity"]:
        return ["eval.metrics=null"]
    return []


def _model_task(path: Path) -> str:
    """The task a plain model folder was saved for (a merged run keeps its head; an encoder
    without one, such as builtin:tiny-bert, is for classification)."""
    config = json.loads((path / "config.json").read_text())
    if _is_classifier(config) or config.get("model_type") in ENCODER_ONLY:
        return "seq_cls"
    if config.get("vision_config") is not None:  # a vision-language model (merged or base)
        return "image_text_to_text"
    return "seq2seq_lm" if config.get("is_encoder_decoder") else "causal_lm"


def _is_classifier(config: dict[str, Any]) -> bool:
    return any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or [])


@dataclass
class Target:
    model: ModelSection
    adapter: Path | None
    recipe: Recipe | None  # set when the target is (inside) a run folder
    run_dir: Path | None


def open_target(path: Path, trust_remote_code: bool = False) -> Target:
    """A run folder, an adapter folder (PEFT save_pretrained), a plain model folder, or a
    builtin model (`builtin:<name>`, as in a recipe's model.name_or_path).

    Python code from the model folder (`auto_map`) runs only when the command line says
    `--trust-remote-code`, never because a run's recipe.yaml says so: the folder may come from
    someone else. A recipe that asks for it without the flag is refused (the model would not
    load without its code anyway)."""
    target = _open_target(path)
    if trust_remote_code:
        model = target.model.model_copy(update={"trust_remote_code": True})
        recipe = target.recipe.model_copy(update={"model": model}) if target.recipe else None
        return Target(model, target.adapter, recipe, target.run_dir)
    if target.model.trust_remote_code:
        raise UserError(
            f"{target.run_dir or path}/recipe.yaml sets model.trust_remote_code: true, which runs Python "
            f"code from {target.model.name_or_path}; peftcli runs code from a folder it was handed only "
            "when asked on the command line",
            "pass --trust-remote-code if you trust that model folder",
        )
    return target


def _open_target(path: Path) -> Target:
    spec = str(path)
    path = path.expanduser()
    if not path.exists() and spec.startswith(builtin.PREFIX):
        folder = Path(builtin.resolve(spec, key=""))
        return Target(ModelSection(name_or_path=spec, task=_model_task(folder)), None, None, None)
    if not path.exists():
        raise UserError(f"no such run, adapter or model folder: {path}")
    run = Layout(path)
    if run.recipe.is_file() and has_adapter(run.adapter):
        from peftcli.recipe_file import load_recipe

        recipe = load_recipe(run.recipe, _recorded_default_metrics(run.recipe), recorded=True)
        return Target(recipe.model, run.adapter, recipe, path)
    if has_adapter(path):
        if Layout(path.parent).recipe.is_file():
            return _open_target(path.parent)
        cfg = json.loads(adapter_file(path).read_text())
        base = cfg.get("base_model_name_or_path")
        if not base:
            raise UserError(f"{path}/adapter_config.json names no base model (base_model_name_or_path)")
        task = task_of_peft_type(cfg.get("task_type"))
        folder = Path(builtin.resolve(base, key="")).expanduser()
        if task == "causal_lm" and (folder / "config.json").is_file():
            task = _model_task(folder)  # a vision-language base: its adapter is a causal LM's to PEFT
        return Target(ModelSection(name_or_path=base, task=task), path, None, None)
    if (path / "config.json").is_file():
        return Target(ModelSection(name_or_path=str(path), task=_model_task(path)), None, None, None)
    if run.recipe.is_file():
        raise UserError(f"{path} holds no adapter yet: the run did not finish", "train it again, or --resume")
    raise UserError(
        f"{path} is not a run, adapter or model folder",
        "expected recipe.yaml + adapter/, adapter_config.json, or config.json",
    )


def labels_of(target: Target) -> list[str] | None:
    """Class names in the order of the classifier's outputs: the run's labels.json, or the
    id2label of a (merged) classifier folder; None when the target has none."""
    from peftcli.model.load import source

    if target.adapter is not None:
        path = target.adapter / LABELS
        return json.loads(path.read_text()) if path.is_file() else None
    if target.model.task != "seq_cls":
        return None
    config = json.loads((Path(source(target.model)) / "config.json").read_text())
    id2label = config.get("id2label")
    if not _is_classifier(config) or not id2label:
        return None  # a base encoder: its head is new, its classes come from the data
    return [id2label[k] for k in sorted(id2label, key=int)]


def saved_tokenizer(target: Target) -> bool:
    """The run or adapter saved its tokenizer (with the chat template it trained with)."""
    return target.adapter is not None and (target.adapter / "tokenizer_config.json").is_file()


def target_tokenizer(target: Target) -> Any:
    """The tokenizer a run or adapter saved (its chat template included), else the base model's."""
    from peftcli.model.load import load_tokenizer

    if saved_tokenizer(target):
        return load_tokenizer(target.model.model_copy(update={"name_or_path": str(target.adapter)}))
    return load_tokenizer(target.model)


def eval_split(target: Target, tokenizer: Any, data: Path | None, labels: list[str] | None) -> Any:
    """The examples to evaluate `target` on: a given file, or the eval split of its run."""
    from peftcli.data import cache, encode
    from peftcli.recipe import DataSection

    task = target.model.task
    if data is not None:
        section = target.recipe.data if target.recipe else DataSection(train=str(data))
        return encode.prepare_file(str(data), section, tokenizer, task, labels)
    if target.recipe is None:
        raise UserError("this target has no recipe to take eval data from", "pass --data FILE")
    prepared = cache.prepare(target.recipe.data, tokenizer, target.recipe.training.seed, task)
    if prepared.eval is None:
        raise UserError(
            f"the run's recipe has no eval split (data.eval: {target.recipe.data.eval})", "pass --data FILE"
        )
    return prepared.eval
