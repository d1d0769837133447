"""Checks that need no weights and no torch: what `peftcli validate` runs, and what `peftcli
train` runs before it loads anything heavy. Each check raises `UserError` on a problem and
otherwise returns a line saying what it found.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from peftcli.errors import UserError
from peftcli.objectives import OBJECTIVES
from peftcli.recipe import Recipe
from peftcli.run_folder.layout import Layout
from peftcli.tasks import ENCODER_ONLY, TASKS

# Architectures whose position embeddings are a learned table: a longer input fails with an
# index error mid-training. model_type → (config key of the table size, slots kept for padding).
LEARNED_POSITIONS = {
    "gpt2": ("n_positions", 0),
    "gpt_neo": ("max_position_embeddings", 0),
    "opt": ("max_position_embeddings", 0),
    "bart": ("max_position_embeddings", 0),
    "mbart": ("max_position_embeddings", 0),
    "bert": ("max_position_embeddings", 0),
    "distilbert": ("max_position_embeddings", 0),
    "electra": ("max_position_embeddings", 0),
    "albert": ("max_position_embeddings", 0),
    "roberta": ("max_position_embeddings", 2),
    "xlm-roberta": ("max_position_embeddings", 2),
    "camembert": ("max_position_embeddings", 2),
}


def model_folder(recipe: Recipe) -> Path | None:
    """The local folder holding the model's files, or None for a hub id not in the local cache."""
    from peftcli.model.load import source

    src = source(recipe.model)
    if Path(src).is_dir():
        return Path(src)
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(src, "config.json", revision=recipe.model.revision)
    return Path(cached).parent if isinstance(cached, str) else None


def read_config(folder: Path, name: str) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise UserError(
            f"model.name_or_path: {name} has no config.json", "is it a Hugging Face model folder?"
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"model.name_or_path: {path} is not valid JSON ({exc})") from None


def check_model(recipe: Recipe, config: dict[str, Any] | None) -> list[str]:
    """The task and method fit the architecture; returns what was found, and notes."""
    if config is None:
        from peftcli.methods import METHODS
        from peftcli.methods.apply import check_fit

        notes = check_fit(
            METHODS[recipe.peft.method],
            recipe.peft,
            recipe.model.task,
            None,
            recipe.model.quantization != "none",
            recipe.data.packing,
        )
        return [
            f"model: {recipe.model.name_or_path} (hub id, not in the local cache: its config and "
            "target modules are checked when training starts)",
            *notes,
        ]
    task, kind = recipe.model.task, config.get("model_type", "?")
    encoder_decoder = bool(config.get("is_encoder_decoder"))
    if task == "seq2seq_lm" and not encoder_decoder:
        raise UserError(
            f"model.task: seq2seq_lm needs an encoder-decoder model; {kind} is not one", "use causal_lm"
        )
    if config.get("vision_config") is not None and not TASKS[task].vision:
        raise UserError(
            f"model.task: {task}, but {kind} is a vision-language model", "set model.task: image_text_to_text"
        )
    if TASKS[task].vision and config.get("vision_config") is None:
        raise UserError(
            f"model.task: {task} needs a vision-language model; {kind} has no vision part", "use causal_lm"
        )
    if task == "causal_lm" and (encoder_decoder or kind in ENCODER_ONLY):
        raise UserError(
            f"model.task: causal_lm does not fit {kind} "
            f"({'encoder-decoder' if encoder_decoder else 'encoder-only'})",
            f"use {'seq2seq_lm' if encoder_decoder else 'seq_cls'}",
        )
    from peftcli.methods import METHODS
    from peftcli.methods.apply import check_fit

    notes = check_fit(
        METHODS[recipe.peft.method],
        recipe.peft,
        task,
        kind,
        recipe.model.quantization != "none",
        recipe.data.packing,
    )
    check_positions(recipe, config)
    if recipe.model.quantization != "none" and importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(
            f"model.quantization: {recipe.model.quantization} needs bitsandbytes",
            "pip install 'bitsandbytes>=0.48'",
        )
    return [f"model: {recipe.model.name_or_path} ({kind}, {task})", *notes]


def check_positions(recipe: Recipe, config: dict[str, Any]) -> None:
    """data.max_length (plus a prompt method's virtual tokens) fits a learned position table."""
    from peftcli.methods import METHODS

    kind = config.get("model_type", "?")
    key, reserved = LEARNED_POSITIONS.get(kind, (None, 0))
    size = config.get(key) if key else None
    if not isinstance(size, int):
        return
    limit = size - reserved
    method = METHODS[recipe.peft.method]
    virtual = 0
    if method.kind == "prompt":
        virtual = int(
            recipe.peft.options.get("num_virtual_tokens", method.defaults.get("num_virtual_tokens", 0))
        )
    if recipe.data.max_length + virtual > limit:
        plus = f" + {virtual} virtual tokens of {method.name}" if virtual else ""
        raise UserError(
            f"data.max_length: {recipe.data.max_length}{plus} is more than the {limit} positions "
            f"{recipe.model.name_or_path} ({kind}) has",
            f"set data.max_length to {limit - virtual} or less",
        )


def check_targets(recipe: Recipe, folder: Path | None) -> list[str]:
    """Target modules from the checkpoint's weight names, and what they reach per kind of
    parameter (peftcli.methods.coverage); nothing when they cannot be read."""
    from peftcli.methods import METHODS
    from peftcli.methods.coverage import lines, of_recipe

    method = METHODS[recipe.peft.method]  # its peft.options were checked with the schema
    if method.kind != "targets":
        return [f"peft: {method.name} ({method.kind} method: adds virtual tokens, no target modules)"]
    found = of_recipe(recipe, folder)
    if found is None:
        return []
    targets, coverage = found
    shown = ", ".join(targets["target_modules"][:8]) + (", ..." if len(targets["target_modules"]) > 8 else "")
    line = f"peft: {method.name} on {len(targets['names'])} modules ({shown})"
    if targets.get("parameters"):
        line += (
            f" and {len(targets['parameters'])} parameters ({', '.join(targets['target_parameters'][:4])})"
        )
    return [line, *lines(coverage), *_vision_parts(recipe, folder, targets["names"])]


def _vision_parts(recipe: Recipe, folder: Path | None, adapted: list[str]) -> list[str]:
    """A vision-language model's parameters per part (from the checkpoint's headers)."""
    from math import prod

    from peftcli.methods.targets import safetensors_shapes
    from peftcli.model.parts import PARTS, part_lines, part_notes, part_of

    if not TASKS[recipe.model.task].vision or folder is None:
        return []
    counts = {p: {"params": 0} for p in PARTS}
    for key, shape in safetensors_shapes(folder).items():
        counts[part_of(key)]["params"] += prod(shape)
    modules = {p: sum(part_of(n) == p for n in adapted) for p in PARTS}
    peft = recipe.peft
    return part_lines(counts, part_notes(peft.method, modules, peft.train_projector, peft.train_vision))


def check_data(recipe: Recipe, folder: Path | None) -> list[str]:
    """Every row is read (streaming) and checked against its format; says which format."""
    from peftcli.data import formats, sources

    task, section = recipe.model.task, recipe.data
    if sources.is_hub_dataset(section.train):
        return [f"data: hub dataset {section.train} (read when training starts)"]
    if not OBJECTIVES[recipe.training.objective].task_loss:
        return check_preference_data(recipe)
    found = formats.scan(section.train, section.format, task)
    how = (
        f" (detected from the columns {', '.join(formats.FORMAT_COLUMNS[found.format])})"
        if section.format == "auto"
        else ""
    )
    lines = [f"data: {found.rows} rows of {found.format}{how}"]
    if found.format in formats.CHAT_FORMATS and not found.answers and section.train_on == "completion":
        raise UserError(
            f"data.train: no conversation in {section.train} has an assistant turn, and training learns "
            "the assistant's turns (data.train_on: completion)",
            "add the answers as assistant turns, or set data.train_on: all",
        )
    if found.labels is not None:
        if len(found.labels) < 2:
            raise UserError(
                f"data.train: every row of {section.train} has the label {found.labels[0]}; a classifier "
                "needs at least 2 classes",
                "add rows of the other classes",
            )
        check_labels(recipe, found.labels)
        shown = ", ".join(found.labels[:10]) + (", ..." if len(found.labels) > 10 else "")
        lines.append(f"labels: {len(found.labels)} classes ({shown})")
    if isinstance(section.eval, str) and not sources.is_hub_dataset(section.eval):
        held_out = formats.scan(section.eval, found.format, task, "data.eval")
        unknown = [x for x in held_out.labels or [] if x not in (found.labels or [])]
        if unknown:
            raise UserError(
                f"data.eval: label {unknown[0]!r} is not one of the training labels ({', '.join(found.labels or [])})",
                "every class of the eval data must occur in data.train",
            )
        lines.append(f"eval data: {held_out.rows} rows")
    if "exact_match" in (recipe.eval.metrics or []) and found.format == "text":
        raise UserError(
            "eval.metrics: exact_match needs prompts with reference answers, and data.format text has none",
            "use a completion, alpaca or chat format, or drop exact_match",
        )
    if found.format in formats.CHAT_FORMATS:
        if section.chat_template is not None:
            formats.chat_template(section)  # the file exists
        elif folder is not None and not has_chat_template(folder):
            raise UserError(
                f"data.format: {found.format} needs a chat template, and {recipe.model.name_or_path} has none",
                "set data.chat_template (a Jinja string or a .jinja file), or use the completion format",
            )
    return lines


def check_preference_data(recipe: Recipe) -> list[str]:
    """Preference rows (pairs, or KTO's labelled answers), every one checked; the starting adapter."""
    from peftcli.data import preference, sources

    section, objective = recipe.data, recipe.training.objective
    fmt, rows = preference.scan(section.train, section.format, objective)
    lines = [f"data: {rows} rows of {fmt} (training.objective: {objective})"]
    if isinstance(section.eval, str) and not sources.is_hub_dataset(section.eval):
        lines.append(f"eval data: {preference.scan(section.eval, fmt, objective, 'data.eval')[1]} rows")
    if fmt == "prompts":  # the rewards' code is imported and called once, on the first row
        from peftcli.objectives.rewards import try_rewards

        lines.append(try_rewards(recipe.grpo.rewards, sources.Source(section.train).first()[1]))
    return lines


def check_init_from(recipe: Recipe, config: dict[str, Any] | None) -> str:
    """The adapter `peft.init_from` names exists, is of the recipe's method and fits the model
    and task; says which settings the run takes from it."""
    from peftcli.methods import METHODS
    from peftcli.methods.saved import adapter_config, check_method
    from peftcli.tasks import task_of_peft_type

    peft = recipe.peft
    folder, adapter = adapter_config(peft.init_from or "")
    check_method(folder, adapter, peft.method)
    trained_on = _trained_on(folder, adapter)
    task = task_of_peft_type(adapter.get("task_type"))
    if task != recipe.model.task:
        raise UserError(
            f"peft.init_from: the adapter in {folder} was trained for {task} on {trained_on}; "
            f"model.task is {recipe.model.task}",
            "start from an adapter of the same model and task",
        )
    base = Path(str(adapter.get("base_model_name_or_path") or "")).expanduser()
    if config is not None and (base / "config.json").is_file():
        theirs = json.loads((base / "config.json").read_text(encoding="utf-8"))
        for key in ("model_type", "hidden_size", "num_hidden_layers"):
            if key in theirs and key in config and theirs[key] != config[key]:
                raise UserError(
                    f"peft.init_from: the adapter in {folder} was trained on {trained_on} "
                    f"({key} {theirs[key]}); model.name_or_path is {recipe.model.name_or_path} ({key} {config[key]})",
                    "start from an adapter trained on this model",
                )
    method = METHODS[peft.method]
    keys = [*method.generic, *(["target_modules", "layers"] if method.kind == "targets" else [])]
    shown = ", ".join(f"{k}={getattr(peft, k)}" for k in keys if getattr(peft, k) is not None)
    return f"peft: starts from the {method.name} adapter in {folder}, with its settings" + (
        f" ({shown})" if shown else ""
    )


def _trained_on(folder: Path, adapter: dict[str, Any]) -> str:
    """The model an adapter was trained on, as its run's recipe names it (builtin:tiny-bert),
    else as its adapter_config.json does."""
    for run in (folder.parent, folder.parent.parent.parent):  # run/adapter, run/checkpoints/step-N/adapter
        recorded = Layout(run).recipe
        if recorded.is_file():
            try:
                from peftcli.recipe_file import parse_yaml

                name = (
                    (parse_yaml(recorded.read_text(encoding="utf-8")) or {})
                    .get("model", {})
                    .get("name_or_path")
                )
            except Exception:  # a damaged record: fall back to the adapter's own
                name = None
            if isinstance(name, str):
                return name
    return str(adapter.get("base_model_name_or_path") or "an unnamed base model")


def check_labels(recipe: Recipe, labels: list[str]) -> None:
    """model.num_labels, when set, agrees with the classes of the training data."""
    n = recipe.model.num_labels
    if n is not None and n != len(labels):
        raise UserError(
            f"model.num_labels: {n}, but the training data has {len(labels)} labels ({', '.join(labels)})",
            "remove model.num_labels to take it from the data",
        )


def has_chat_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    config = folder / "tokenizer_config.json"
    return config.is_file() and bool(json.loads(config.read_text(encoding="utf-8")).get("chat_template"))


TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def check_trackers(recipe: Recipe) -> None:
    for tracker in recipe.training.report_to:
        package = TRACKER_PACKAGES.get(tracker)
        if package and importlib.util.find_spec(package) is None:
            raise UserError(
                f"training.report_to: {tracker} needs the {package} package", f"pip install {package}"
            )


def check_recipe(recipe: Recipe) -> list[str]:
    """Every check that needs no weights; returns what was found, one line per stage."""
    folder = model_folder(recipe)
    config = read_config(folder, recipe.model.name_or_path) if folder is not None else None
    lines = check_model(recipe, config)
    if recipe.peft.init_from is not None:  # before its target modules are looked for on this model
        lines.append(check_init_from(recipe, config))
    lines += check_targets(recipe, folder) or [
        "peft: target modules are checked when the model's config is loaded"
    ]
    lines += check_data(recipe, folder)
    check_trackers(recipe)
    if recipe.training.eval_every is not None and not recipe.data.eval:
        # A note, not an error: `data.eval=0` on a recipe that evaluates should just work.
        lines.append(
            f"training.eval_every does not apply without an eval split (data.eval: {recipe.data.eval}): ignored"
        )
    return lines
