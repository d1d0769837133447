"""`peftcli train`, `validate`, `schema` and `methods`: the recipe and what it trains."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from peftcli.cli_app import JsonOpt, OverridesArg, RecipeArg, app
from peftcli.console import emit


@app.command()
def train(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue an unfinished run from its newest checkpoint.")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing run (swapped in when the new one ends).")
    ] = False,
    num_processes: Annotated[
        int | None, typer.Option(help="Data-parallel processes on this machine (via accelerate launch).")
    ] = None,
    launch_config: Annotated[
        Path | None,
        typer.Option(help="An Accelerate config (configs/*.yaml): DDP, FSDP, DeepSpeed, multi-node."),
    ] = None,
    max_restarts: Annotated[
        int, typer.Option(min=0, help="Restart a failed group up to N times, from its newest checkpoint.")
    ] = 0,
    join_timeout: Annotated[
        int | None, typer.Option(min=1, help="Seconds to wait for every machine to join [default: 900].")
    ] = None,
) -> None:
    """Train a recipe; the run folder gets adapter/, metrics.jsonl, eval.json, loss.png."""
    from peftcli.commands.train import run_train

    how = (num_processes, launch_config, max_restarts, join_timeout)
    raise typer.Exit(run_train(recipe, overrides, resume, overwrite, *how))


@app.command()
def validate(recipe: RecipeArg, overrides: OverridesArg = None) -> None:
    """Check a recipe — schema, model config, target modules, data — without training."""
    from peftcli.recipe_file import load_recipe
    from peftcli.validation import validate

    r = load_recipe(recipe, overrides)
    for line in validate(r):
        typer.echo(line)
    typer.echo(f"ok: {recipe} is valid")


@app.command()
def schema() -> None:
    """Print the recipe's JSON Schema."""
    from peftcli.recipe import Recipe

    emit(Recipe.model_json_schema(), json_out=True)


@app.command()
def methods(json_out: JsonOpt = False) -> None:
    """List the PEFT methods, whether they merge, and their trainable share of a reference model."""
    from peftcli.methods import METHODS
    from peftcli.methods.reference import load

    table = load()
    rows = []
    for m in METHODS.values():
        ref = table["methods"].get(m.name, {})
        rows.append(
            {
                "method": m.name,
                "peft_config": m.config_class,
                "mergeable": m.merges,
                "tasks": sorted(m.tasks),
                "summary": m.summary,
                "trainable_params": ref.get("trainable_params"),
                "share": ref.get("share"),
            }
        )
    emit({"reference": table["reference"], "methods": rows}, json_out, _format_methods)


def _format_methods(table: dict) -> str:
    rows = table["methods"]
    width = max(len(r["method"]) for r in rows)
    lines = [f"{'method':<{width}}  merges  {'trainable':>9}  what it is"]
    for r in rows:
        share = f"{100 * r['share']:.3f}%" if r["share"] is not None else "-"
        lines.append(
            f"{r['method']:<{width}}  {'yes' if r['mergeable'] else 'no':<6}  {share:>9}  {r['summary']}"
        )
    lines.append(
        f"\ntrainable: share of {table['reference']}'s parameters with the recipe defaults "
        "(r=8, all linear layers, 16 virtual tokens)"
    )
    return "\n".join(lines)
