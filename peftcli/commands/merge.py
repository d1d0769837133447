"""`peftcli merge`: fold an adapter (or a weighted combination of several LoRA adapters) into
the base weights and write a plain transformers model folder — it loads with
`AutoModelFor*.from_pretrained`, without peftcli or PEFT.

The merge itself happens in memory in peftcli.merging (shared with `export`): PEFT's
`merge_and_unload` / `add_weighted_adapter` in float32, a quantized base dequantized first.
This command adds the weighted combinations, the loss comparison for quantized bases, and OUT,
which appears only once it is complete.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path
from typing import Any

from peftcli import outputs
from peftcli.errors import UserError, did_you_mean
from peftcli.merge_change import describe as describe_change
from peftcli.merging import (
    Source,
    load_adapter_model,
    load_bases,
    load_tokenizer_of,
    merged_model,
    open_sources,
    vllm_note_of,
)
from peftcli.methods import METHODS
from peftcli.run_folder.layout import Layout
from peftcli.target import Target, labels_of
from peftcli.tasks import TASKS

DTYPES = ("auto", "float32", "bfloat16", "float16")
# PEFT's add_weighted_adapter combinations. `cat` stacks the adapters (rank = sum of ranks), so
# the merged delta is exactly Σ wᵢ·ΔWᵢ; `linear` averages A and B separately (cross terms).
COMBINATIONS = (
    "cat",
    "linear",
    "svd",
    "ties",
    "ties_svd",
    "dare_linear",
    "dare_ties",
    "dare_linear_svd",
    "dare_ties_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
)
NEEDS_DENSITY = {c for c in COMBINATIONS if c.startswith(("ties", "dare", "magnitude"))}
REPORT_FILE = "merge_report.json"


def _base_key(source: Source) -> tuple[Any, ...]:
    from peftcli.model.load import source as model_source

    m = source.target.model
    return (model_source(m), m.revision, m.task, m.quantization)


def check_combination(
    sources: list[Source], weights: list[float] | None, combination: str, density: float | None
) -> list[float] | None:
    """Several adapters: same base, same LoRA method; returns one weight per adapter (or None
    for a plain single-adapter merge)."""
    if combination not in COMBINATIONS:
        raise UserError(
            f"--combination: `{combination}` is not one of {', '.join(COMBINATIONS)}"
            f"{did_you_mean(combination, COMBINATIONS)}"
        )
    if len(sources) == 1 and weights is None:
        return None
    weights = weights if weights is not None else [1.0 / len(sources)] * len(sources)
    if len(weights) != len(sources):
        raise UserError(
            f"--weights has {len(weights)} values for {len(sources)} adapters", "give one weight per adapter"
        )
    for s in sources:
        if not METHODS[s.method].combines:
            combines = [m.name for m in METHODS.values() if m.combines]
            raise UserError(
                f"{s.path}: {s.method} adapters cannot be combined with --weights",
                f"weighted combinations work for {' and '.join(combines)} adapters",
            )
    first = sources[0]
    for s in sources[1:]:
        if s.method != first.method:
            raise UserError(
                f"cannot combine {first.path} ({first.method}) with {s.path} ({s.method})",
                "combine adapters of one method",
            )
        if _base_key(s) != _base_key(first):
            a, b = first.target.model, s.target.model
            raise UserError(
                f"cannot combine {first.path} (base {a.name_or_path}, {a.task}, quantization {a.quantization}) "
                f"with {s.path} (base {b.name_or_path}, {b.task}, quantization {b.quantization})",
                "combine adapters trained on the same base model",
            )
    if combination in NEEDS_DENSITY and density is None:
        raise UserError(
            f"--combination {combination} needs --density", "the share of each update kept, e.g. 0.5"
        )
    if density is not None and not 0 < density <= 1:
        raise UserError(f"--density: {density} is not in (0, 1]")
    return weights


def check_out(out: Path, sources: list[Source], overwrite: bool) -> None:
    """OUT follows the rule of every peftcli output (see peftcli.outputs): a new or empty folder,
    or with --overwrite an earlier merge output; never what the merge reads, nor the folder
    holding the run's data or recipe."""
    outputs.check_location(out, "-o", reads_of(sources), reader="the merge")
    outputs.check_replace(out, "merge", "-o", overwrite)


def reads_of(sources: list[Source]) -> list[Path]:
    """What a merge reads, or must not replace: the adapters, their runs, the base model folder,
    and the local files each run's recipe was trained on."""
    from peftcli.model.load import source as model_source
    from peftcli.run_folder.plan import protected_paths

    paths = [s.adapter for s in sources] + [s.target.run_dir for s in sources if s.target.run_dir]
    paths += [Path(m) for s in sources if Path(m := model_source(s.target.model)).exists()]
    paths += [p for s in sources if s.target.recipe is not None for p in protected_paths(s.target.recipe)]
    return paths


def save_dtype(choice: str, target: Target) -> Any:
    """`auto`: the base checkpoint's own dtype (float32 when its config names none)."""
    import torch

    from peftcli.model.load import load_config

    if choice not in DTYPES:
        raise UserError(
            f"--dtype: `{choice}` is not one of {', '.join(DTYPES)}{did_you_mean(choice, DTYPES)}"
        )
    if choice != "auto":
        return getattr(torch, choice)
    task = "image_text_to_text" if TASKS[target.model.task].vision else "causal_lm"  # no classifier labels
    config = load_config(target.model.model_copy(update={"task": task}))
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


# --------------------------------------------------------------------------- merging


def merge(
    paths: list[Path],
    out: Path,
    dtype: str = "auto",
    weights: list[float] | None = None,
    combination: str = "cat",
    density: float | None = None,
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Merge and write OUT; returns the report (also written to OUT/merge_report.json)."""
    from peftcli.console import quiet_libraries, say

    sources = open_sources(paths, trust_remote_code)
    weights = check_combination(sources, weights, combination, density)
    check_out(out, sources, overwrite)
    quiet_libraries()
    first = sources[0]
    section = first.target.model
    dtype_out = save_dtype(dtype, first.target)
    labels = labels_of(first.target)
    for s in sources:
        if s.target.recipe is None:  # adapter_config.json does not record a quantized base
            say(
                f"peftcli: note: {s.path} is not inside a run, so the base is taken as stored; "
                "merge an adapter trained on a 4/8-bit base from its run folder"
            )
    base, quantized_model = load_bases(section, labels)
    tokenizer = load_tokenizer_of(first)
    change: dict[str, Any] = {"rows": eval_rows(first, tokenizer, labels), "task": section.task}
    merged = merged_model(base, sources, weights, combination, density, change).to(dtype_out).eval()
    report: dict[str, Any] = {
        "sources": [str(s.path) for s in sources],
        "method": first.method,
        "base": section.name_or_path,
        "task": section.task,
        "dtype": str(dtype_out).removeprefix("torch."),
        "dequantized": section.quantization if quantized_model is not None else None,
        "change": change,
    }
    if weights is not None:
        report.update(combination=combination, weights=weights, density=density)
    if quantized_model is not None and weights is None:
        report["eval"] = compare_losses(first, quantized_model, merged, tokenizer, labels)
    elif quantized_model is not None:  # no single adapter to compare the combination with
        report["eval"] = {"note": "skipped: several adapters were combined"}
    write_folder(out, merged, tokenizer, report, overwrite)
    write_merged_card(out.expanduser(), first, report)
    for line in describe_change(change):
        say(line)
    say(f"peftcli: wrote {out} ({report['dtype']}); load it with {_auto_class(section.task)}.from_pretrained")
    if len(sources) == 1 and (note := vllm_note_of(first)):
        say(note)
    return report


def eval_rows(source: Source, tokenizer: Any, labels: Any) -> list[dict[str, Any]]:
    """A few rows of the run's eval split, whose logits the merge report compares (none for an
    adapter folder without a run, or a run without an eval split)."""
    from peftcli.merge_change import ROWS
    from peftcli.target import eval_split

    if source.target.recipe is None:
        return []
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # the data stage's progress is not merge's
            rows = list(eval_split(source.target, tokenizer, None, labels).examples[:ROWS])
    except UserError:
        return []
    from peftcli.data.images import image_inputs

    return [
        r | {"image_inputs": image_inputs(tokenizer.processor, r["images"])} if r.get("images") else r
        for r in rows
    ]


def write_merged_card(out: Path, first: Source, report: dict[str, Any]) -> None:
    """OUT/README.md: a Hub model card of the merged model (`library_name: transformers`), from
    the run's recipe and results where the adapter came from a run."""
    from peftcli.cards import write_card

    target = first.target
    recipe: Any = target.recipe or {
        "model": {"name_or_path": target.model.name_or_path, "task": target.model.task},
        "peft": {"method": first.method},
    }
    results = Layout(target.run_dir).read_results() if target.run_dir else {}
    write_card(out, "merged", recipe, {**results, "merge": report})


def compare_losses(
    source: Source, quantized: Any, merged: Any, tokenizer: Any, labels: Any
) -> dict[str, Any]:
    """Eval loss of the adapter on its quantized base vs the merged model, on the run's eval
    split: what dequantizing and merging changed."""
    from peftcli.console import say
    from peftcli.recipe import TrainingSection
    from peftcli.target import eval_split
    from peftcli.training.accelerator import make_accelerator
    from peftcli.training.evaluate import loss_metrics

    if source.target.recipe is None:
        note = "skipped: the target is an adapter folder without a run, so there is no eval split"
        say(f"peftcli: note: loss comparison {note}")
        return {"note": note}
    try:
        split = eval_split(source.target, tokenizer, None, labels)
    except UserError as exc:
        say(f"peftcli: note: loss comparison skipped: {exc.message}")
        return {"note": f"skipped: {exc.message}"}
    recipe = source.target.recipe
    accelerator = make_accelerator(TrainingSection(report_to=["jsonl"], mixed_precision="no"), Path("."))
    task, batch, pad = recipe.model.task, recipe.training.batch_size, tokenizer.pad_token_id
    adapter_model = load_adapter_model(quantized, [source], ["default"])
    processor = getattr(tokenizer, "processor", None)
    adapter_loss = loss_metrics(adapter_model, split, task, accelerator, batch, pad, processor)["loss"]
    merged.to(accelerator.device)
    merged_loss = loss_metrics(merged, split, task, accelerator, batch, pad, processor)["loss"]
    merged.to("cpu")
    result = {
        "adapter_loss": adapter_loss,
        "merged_loss": merged_loss,
        "change": merged_loss - adapter_loss,
        "examples": len(split.examples),
    }
    say(
        f"peftcli: eval loss on the run's eval split ({result['examples']} examples): adapter on the "
        f"{recipe.model.quantization} base {adapter_loss:.4f}, merged {merged_loss:.4f} "
        f"({result['change']:+.4f})"
    )
    return result


def write_folder(out: Path, model: Any, tokenizer: Any, report: dict[str, Any], overwrite: bool) -> None:
    """Write into a hidden folder beside OUT and rename it into place: a failed or interrupted
    merge leaves no partial OUT, and an existing OUT is replaced only by a complete one."""
    out = out.expanduser()
    work = outputs.work_folder(out)
    try:
        try:
            model.save_pretrained(work)
            getattr(tokenizer, "processor", tokenizer).save_pretrained(work)  # a processor: its tokenizer too
            (work / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
            outputs.mark(work, "merge")
        except OSError as exc:
            raise UserError(f"cannot write {out}: {exc.strerror or exc}") from None
        except Exception as exc:  # the safetensors writer reports I/O errors as its own type
            if type(exc).__name__ != "SafetensorError":
                raise
            raise UserError(f"cannot write {out}: {str(exc).splitlines()[0]}") from None
        outputs.follow_umask(work)
        outputs.check_replace(out, "merge", "-o", overwrite)  # again: OUT may have appeared meanwhile
        outputs.swap_in(work, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _auto_class(task: str) -> str:
    from peftcli.tasks import TASKS

    return TASKS[task].auto_class


def parse_weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise UserError(
            f"--weights: `{text}` is not a comma-separated list of numbers, e.g. 0.5,0.5"
        ) from None
