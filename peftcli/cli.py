"""The `peftcli` command line. Heavy libraries are imported inside command bodies so that
`--help`, `validate`, `schema` and `methods` answer at once."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from .errors import UserError

app = typer.Typer(
    name="peftcli",
    help="Parameter-efficient fine-tuning of Hugging Face models from a YAML recipe.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)

_state = {"debug": False}

RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)]
OverridesArg = Annotated[
    list[str] | None,
    typer.Argument(help="Dotted overrides, e.g. training.lr=1e-4 peft.r=16.", show_default=False),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout, nothing else.")]


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for every error.")] = False,
) -> None:
    _state["debug"] = debug or os.environ.get("PEFTCLI_DEBUG", "") not in ("", "0")


def _print_json(obj: object) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


@app.command()
def train(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite", help="Replace an existing run (swapped in only when the new one finishes)."
        ),
    ] = False,
) -> None:
    """Train a recipe; the run folder gets adapter/, metrics.jsonl, eval.json, loss.png."""
    from .recipe import load_recipe
    from .run import train as run_train

    run_train(load_recipe(recipe, overrides), overwrite=overwrite)


@app.command()
def validate(recipe: RecipeArg, overrides: OverridesArg = None) -> None:
    """Check a recipe — schema, model config, target modules, data — without training."""
    from .checks import check_recipe
    from .recipe import load_recipe

    r = load_recipe(recipe, overrides)
    for line in check_recipe(r):
        typer.echo(line)
    typer.echo(f"ok: {recipe} is valid")


@app.command()
def schema() -> None:
    """Print the recipe's JSON Schema."""
    from .recipe import Recipe

    _print_json(Recipe.model_json_schema())


@app.command()
def methods(json_out: JsonOpt = False) -> None:
    """List the PEFT methods, whether they merge, and their trainable share of a reference model."""
    from .methods import METHODS
    from .reference import load

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
    if json_out:
        _print_json({"reference": table["reference"], "methods": rows})
        return
    width = max(len(r["method"]) for r in rows)
    typer.echo(f"{'method':<{width}}  merges  {'trainable':>9}  what it is")
    for r in rows:
        share = f"{100 * r['share']:.3f}%" if r["share"] is not None else "-"
        typer.echo(
            f"{r['method']:<{width}}  {'yes' if r['mergeable'] else 'no':<6}  {share:>9}  {r['summary']}"
        )
    typer.echo(
        f"\ntrainable: share of {table['reference']}'s parameters with the recipe defaults "
        "(r=8, all linear layers, 16 virtual tokens)"
    )


@app.command("eval")
def eval_cmd(
    target: Annotated[
        Path, typer.Argument(help="A run folder, an adapter folder or a model folder.", show_default=False)
    ],
    data: Annotated[
        Path | None, typer.Option("--data", help="Evaluate on this file instead of the run's eval split.")
    ] = None,
    compare_base: Annotated[
        bool, typer.Option("--compare-base", help="Also evaluate the base model without the adapter.")
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Loss, perplexity and exact match (where the data has reference answers)."""
    from .evaluate_cmd import run_eval

    result = run_eval(target, data, compare_base)
    if json_out:
        _print_json(result)
    else:
        from .evaluate_cmd import format_result

        typer.echo(format_result(result))


@app.command("data")
def data_cmd(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    preview: Annotated[int, typer.Option("--preview", min=0, help="Training rows to show.")] = 3,
    json_out: JsonOpt = False,
) -> None:
    """Show how the data is formatted, tokenised, masked and packed: statistics and the first rows."""
    from .data_cmd import format_report, run_data

    report = run_data(recipe, overrides, preview)
    if json_out:
        _print_json(report.as_json())
    else:
        typer.echo(format_report(report, color=sys.stdout.isatty()))


# Typer vendors click; find its exception base without naming a private module.
_ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def main() -> None:
    try:
        code = app(standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except UserError as exc:
        if _state["debug"]:
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except _ClickException as exc:
        known = {c.name or c.callback.__name__ for c in app.registered_commands}
        command = next((a for a in sys.argv[1:] if a in known), "")
        print(
            f"error: {exc.format_message()} (see `peftcli {command + ' ' if command else ''}--help`)",
            file=sys.stderr,
        )
        sys.exit(2)
    except typer.Abort:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
