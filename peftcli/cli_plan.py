"""`peftcli data`, `estimate`, `compare` and `env`: looking before training, and at the machine."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from peftcli.cli_app import JsonOpt, OverridesArg, RecipeArg, app
from peftcli.console import emit
from peftcli.errors import UserError


@app.command("data")
def data_cmd(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    preview: Annotated[int, typer.Option("--preview", min=0, help="Training rows to show.")] = 3,
    json_out: JsonOpt = False,
) -> None:
    """Show how the data is formatted, tokenised, masked and packed: statistics and the first rows."""
    from peftcli.commands.data import format_report, run_data

    report = run_data(recipe, overrides, preview)
    emit(report.as_json(), json_out, lambda _: format_report(report, color=sys.stdout.isatty()))


@app.command()
def estimate(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    gpu_memory: Annotated[
        str | None,
        typer.Option("--gpu-memory", help="Say whether the run fits in this much GPU memory, e.g. 24GB."),
    ] = None,
    num_processes: Annotated[
        int, typer.Option("--num-processes", min=1, help="Processes: memory each holds, DDP and FSDP.")
    ] = 1,
    json_out: JsonOpt = False,
) -> None:
    """Parameter counts and a memory plan, from the model's config alone (no weights loaded)."""
    from peftcli.commands.estimate import estimate as run_estimate
    from peftcli.commands.estimate_text import format_estimate
    from peftcli.recipe_file import load_recipe

    emit(run_estimate(load_recipe(recipe, overrides), gpu_memory, num_processes), json_out, format_estimate)


@app.command()
def compare(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    methods_opt: Annotated[
        str,
        typer.Option(
            "--methods", help="Comma-separated methods to compare, e.g. lora,ia3,prompt-tuning (or all)."
        ),
    ] = "",
    max_steps: Annotated[
        int | None,
        typer.Option("--max-steps", min=1, help="Optimizer steps per method (default: the recipe's)."),
    ] = None,
    output_dir: Annotated[
        Path | None,
        typer.Option("--output-dir", help="Where the runs and the table go (default runs/<name>-compare)."),
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite", help="Replace an output folder an earlier compare wrote (its table and runs)."
        ),
    ] = False,
    harness: Annotated[
        str | None,
        typer.Option("--harness", help="Also run these lm-evaluation-harness tasks on each method's run."),
    ] = None,
    harness_args: Annotated[
        str | None, typer.Option("--harness-args", help="For lm-eval, e.g. limit=100 (as eval's).")
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Train several methods on the same recipe (model, data, steps, seed) and tabulate them."""
    from peftcli.commands.compare import compare as run_compare
    from peftcli.commands.compare import format_table, parse_methods

    if not methods_opt:
        raise UserError("compare needs --methods", "e.g. --methods lora,ia3,prompt-tuning (or all)")
    methods = parse_methods(methods_opt)
    rows, out = run_compare(
        recipe, overrides or [], methods, max_steps, output_dir, overwrite, harness, harness_args
    )
    written = f"\n\nwrote {out}/compare.csv, compare.md, compare.png"
    emit({"rows": rows}, json_out, lambda result: format_table(result["rows"]) + written)
    if any(str(r.get("error") or "").startswith("crashed") for r in rows):
        raise typer.Exit(1)


@app.command("env")
def env_cmd(json_out: JsonOpt = False) -> None:
    """Versions, devices, backends and cache folders: what a bug report needs."""
    from peftcli.commands.env import collect
    from peftcli.commands.env_text import format_env

    emit(collect(), json_out, format_env)
