"""Model cards: a run's `adapter/README.md` and a merged model's `README.md`, as the Hub reads them.

A card is YAML metadata between `---` lines (written by huggingface_hub's own `ModelCardData`,
so its parser reads it back) and a Markdown body: what the model is, how to load it with plain
transformers/PEFT, the training summary, the final metrics (lm-eval's too), and the recipe.

Metadata: `base_model` (when the base is a Hub id: the Hub refuses anything else there),
`library_name` (`peft` for an adapter, `transformers` once merged), `pipeline_tag` (from the
task's row in peftcli.tasks), `tags` (peftcli, the method, the objective), `datasets` (the Hub
datasets the run trained or evaluated on) and `license` (when the base model's own card
declares one, read from its folder or the local Hub cache: never from the network).

Everything in a card comes from the run's recipe.yaml and eval.json, which hold no secrets.
PEFT's `save_pretrained` writes a card of its own into adapter/; `train` replaces it.

`write_card(folder, kind=...)` is the one entry point: `train` and `eval` call it through
`write_run_card(run_dir)`, `merge` calls it for OUT with `kind="merged"`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from peftcli import outputs
from peftcli.run_folder.layout import CARD, Layout, has_adapter, is_run
from peftcli.run_folder.save import write_json

Kind = Literal["adapter", "merged"]
SIGNATURE = "<!-- written by peftcli -->"


def is_hub_id(name: str | None) -> bool:
    """`org/name` that is not a local path (what the Hub accepts as base_model or a dataset);
    the repo-id rule is the recipe's (peftcli.recipe.HUB_ID)."""
    from peftcli.recipe import HUB_ID

    if not name or "/" not in name or len(name) > 96 or not HUB_ID.fullmatch(name):
        return False
    return not Path(name).expanduser().exists()


def base_license(model: dict[str, Any]) -> str | None:
    """The license the base model's own card declares: its folder's README.md, or the README.md
    in the local Hub cache for a hub id (nothing is downloaded)."""
    name = str(model.get("name_or_path") or "")
    card: Path | None = None
    if Path(name).expanduser().is_dir():
        card = Path(name).expanduser() / CARD
    elif is_hub_id(name):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, CARD, revision=model.get("revision"))
        card = Path(cached) if isinstance(cached, str) else None
    if card is None or not card.is_file():
        return None
    from huggingface_hub import metadata_load

    try:
        value = (metadata_load(card) or {}).get("license")
    except Exception:  # a base card whose YAML does not parse declares nothing we can use
        return None
    return value if isinstance(value, str) else None


def hub_datasets(data: dict[str, Any]) -> list[str]:
    """The Hub datasets among data.train / data.eval (`org/name[@config][:split]`)."""
    from peftcli.data.sources import hub_spec, is_hub_dataset

    found = []
    for spec in (data.get("train"), data.get("eval")):
        if isinstance(spec, str) and is_hub_dataset(spec):
            found.append(hub_spec(spec)[0])
    return list(dict.fromkeys(found))


def metadata(kind: Kind, recipe: dict[str, Any]) -> dict[str, Any]:
    from peftcli.tasks import TASKS

    model, peft = recipe.get("model") or {}, recipe.get("peft") or {}
    objective = (recipe.get("training") or {}).get("objective") or "sft"
    base = model.get("name_or_path")
    meta: dict[str, Any] = {"base_model": base if is_hub_id(base) else None}
    meta["library_name"] = "peft" if kind == "adapter" else "transformers"
    meta["pipeline_tag"] = TASKS[model.get("task") or "causal_lm"].pipeline_tag
    tags = ["peftcli", str(peft.get("method")), objective]
    meta["tags"] = list(dict.fromkeys(tags + (["peft", "merged"] if kind == "merged" else [])))
    meta["datasets"] = hub_datasets(recipe.get("data") or {}) or None
    meta["license"] = base_license(model)
    return {k: v for k, v in meta.items() if v is not None}


def write_card(
    folder: Path,
    kind: Kind = "adapter",
    recipe: Any = None,
    results: dict[str, Any] | None = None,
    recipe_text: str | None = None,
) -> Path:
    """Write `folder/README.md`: a Hub model card for an adapter folder (`kind="adapter"`) or a
    merged model folder (`kind="merged"`). `recipe`: the run's Recipe (or its dict, as in
    recipe.yaml); `results`: the run's eval.json; `recipe_text`: recipe.yaml as written."""
    from huggingface_hub import ModelCard, ModelCardData

    raw = recipe.model_dump(mode="json") if hasattr(recipe, "model_dump") else dict(recipe or {})
    if recipe_text is None and raw:
        import yaml

        recipe_text = yaml.safe_dump(raw, sort_keys=False)
    folder = Path(folder).resolve()  # the load snippets name it; `point_at` swaps it for a repo id
    data = ModelCardData(**metadata(kind, raw))
    body = card_body(kind, raw, results or {}, recipe_text or "", folder)
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{SIGNATURE}\n{body}")
    path = Path(folder) / CARD
    outputs.write_text(path, str(card))
    return path


def write_run_card(run_dir: Path) -> Path | None:
    """A run's adapter/README.md from its recipe.yaml and eval.json (replacing PEFT's card)."""
    from peftcli.recipe_file import parse_yaml

    layout = Layout(run_dir)
    adapter = layout.adapter
    if not has_adapter(adapter) or not layout.recipe.is_file():
        return None
    text = layout.recipe.read_text(encoding="utf-8")
    return write_card(adapter, "adapter", parse_yaml(text) or {}, layout.read_results(), text)


def update_results(run_dir: Path | None, change: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """A later evaluation's results into a run's eval.json (`change(previous) -> new`), written
    whole, and its model card with them; only in a folder peftcli made for a run."""
    if run_dir is None or not is_run(run_dir):
        return
    layout = Layout(run_dir)
    write_json(layout.results, change(layout.read_results()))
    write_run_card(run_dir)


def point_at(folder: Path, repo_id: str) -> str | None:
    """The card of `folder` as it should read on the Hub: peftcli's own card loads from `repo_id`
    instead of the local folder. None when the folder has no card peftcli wrote."""
    folder = Path(folder).resolve()
    path = folder / CARD
    if not path.is_file() or SIGNATURE not in (text := path.read_text(encoding="utf-8")):
        return None
    return text.replace(json.dumps(str(folder)), json.dumps(repo_id))


# --------------------------------------------------------------------------- the body


def card_body(
    kind: Kind, recipe: dict[str, Any], results: dict[str, Any], recipe_text: str, folder: Path
) -> str:
    model, peft = recipe.get("model") or {}, recipe.get("peft") or {}
    base, method = str(model.get("name_or_path") or "?"), str(peft.get("method") or "?")
    objective = (recipe.get("training") or {}).get("objective") or "sft"
    what = "adapter" if kind == "adapter" else "model (the adapter merged into the base weights)"
    lines = [
        f"# {recipe.get('name') or folder.name}",
        "",
        f"A {method} {what} for `{base}`, trained with [peftcli](https://github.com/peftcli/peftcli) "
        f"({objective}, task `{model.get('task') or 'causal_lm'}`) on `{(recipe.get('data') or {}).get('train')}`.",
        "",
        "## How to load it",
        "",
        *usage(kind, model, method, folder),
        *training_section(results.get("train") or {}),
        *metrics_section(results),
        "## Recipe",
        "",
        "The resolved recipe (`peftcli train` with it reproduces the run):",
        "",
        "```yaml",
        recipe_text.rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def usage(kind: Kind, model: dict[str, Any], method: str, folder: Path) -> list[str]:
    from peftcli.tasks import TASKS

    spec = TASKS[model.get("task") or "causal_lm"]
    auto, reader = spec.auto_class, "AutoProcessor" if spec.vision else "AutoTokenizer"
    base, here = str(model.get("name_or_path")), json.dumps(str(folder))
    if kind == "merged":
        code = [
            f"from transformers import {auto}, {reader}",
            "",
            f"model = {auto}.from_pretrained({here})",
        ]
    else:
        shown = json.dumps(base) if not base.startswith("builtin:") else '"<the base model folder>"'
        code = [f"from transformers import {auto}, {reader}", "from peft import PeftModel", ""]
        if own_tuner(method):
            code += ["import peftcli.methods.tuners  # registers peftcli's own PEFT tuner", ""]
        code += [
            f"base = {auto}.from_pretrained({shown})",
            f"model = PeftModel.from_pretrained(base, {here})",
        ]
    code.append(f"{'processor' if spec.vision else 'tokenizer'} = {reader}.from_pretrained({here})")
    notes = []
    if base.startswith("builtin:"):
        notes = [
            f"`{base}` is one of peftcli's builtin test models, made offline by peftcli (it is not on the "
            f"Hub): `peftcli generate` and `peftcli eval` load it by that name.",
            "",
        ]
    return ["```python", *code, "```", "", *notes]


def own_tuner(method: str) -> bool:
    """A method peftcli implements as its own PEFT tuner (loading needs its registration)."""
    from peftcli.methods import METHODS, tuners

    row = METHODS.get(method)
    return row is not None and hasattr(tuners, row.config_class)


def training_section(train: dict[str, Any]) -> list[str]:
    if not train:
        return []
    shown = {
        "steps": "optimizer steps",
        "epochs": "epochs",
        "seconds": "seconds",
        "tokens": "tokens",
        "trainable_params": "trainable parameters",
        "total_params": "parameters in all",
    }
    rows = [f"| {label} | {_fmt(train[key])} |" for key, label in shown.items() if key in train]
    dist = train.get("distributed") or {}
    if dist:
        how = f"{dist.get('type', '?')}, {dist.get('processes', '?')} process(es), mixed precision {dist.get('mixed_precision', '?')}"
        rows.append(f"| how it ran | {how} |")
    return ["## Training", "", "| | |", "| --- | --- |", *rows, ""]


def metrics_section(results: dict[str, Any]) -> list[str]:
    final = {k: v for k, v in results.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    lines: list[str] = []
    if final:
        lines += ["## Evaluation", "", "On the run's held-out split (`peftcli eval`):", ""]
        lines += [
            "| metric | value |",
            "| --- | --- |",
            *[f"| {k} | {_fmt(v)} |" for k, v in final.items()],
            "",
        ]
    harness = results.get("harness") or {}
    if harness:
        lines += [
            "## lm-evaluation-harness",
            "",
            "| task | metric | base | this model |",
            "| --- | --- | --- | --- |",
        ]
        for task, entry in harness.items():
            base = entry.get("base") or {}
            for metric, value in (entry.get("adapter") or {}).items():
                lines.append(f"| {task} | {metric} | {_fmt(base.get(metric, '-'))} | {_fmt(value)} |")
        versions = sorted({str((e.get("config") or {}).get("lm_eval")) for e in harness.values()})
        lines += ["", f"lm-eval {', '.join(versions)}, through `peftcli eval --harness`.", ""]
    return lines


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e5 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)
