"""The `peftcli` Typer app and what its commands share: the argument types and `--debug`.
The commands register on it from peftcli.cli_train, cli_use and cli_plan; peftcli.cli runs it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

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
TrustOpt = Annotated[
    bool,
    typer.Option(
        "--trust-remote-code",
        help="Run Python code shipped with the model folder (auto_map); only for folders you trust. "
        "A run's recipe.yaml alone never turns this on.",
    ),
]


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for every error.")] = False,
) -> None:
    _state["debug"] = debug or os.environ.get("PEFTCLI_DEBUG", "") not in ("", "0")
    os.environ["PEFTCLI_DEBUG"] = "1" if _state["debug"] else ""  # launched processes too
