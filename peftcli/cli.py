"""The `peftcli` command line. Heavy libraries are imported inside command bodies so that
`--help`, `validate`, `schema` and `methods` answer at once."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from peftcli.console import emit
from peftcli.errors import Interrupted, UserError

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
    harness: Annotated[
        str | None,
        typer.Option(
            "--harness",
            help="lm-evaluation-harness tasks instead: names or task YAML files, comma-separated "
            "(e.g. data/harness/uppercase.yaml); needs the harness extra.",
        ),
    ] = None,
    harness_args: Annotated[
        str | None,
        typer.Option("--harness-args", help="For lm-eval, e.g. num_fewshot=5,limit=100,batch_size=8."),
    ] = None,
    trust_remote_code: TrustOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Loss, perplexity and exact match (where the data has reference answers), or lm-eval tasks."""
    from peftcli.commands.eval import format_result, run_eval

    result = run_eval(target, data, compare_base, trust_remote_code, harness, harness_args)
    if harness is not None:
        from peftcli.harness import format_result
    emit(result, json_out, format_result)


@app.command()
def merge(
    targets: Annotated[
        list[Path],
        typer.Argument(
            help="A run or adapter folder; several LoRA adapters on one base are combined first.",
            show_default=False,
        ),
    ],
    out: Annotated[Path, typer.Option("-o", "--out", help="The model folder to write.", show_default=False)],
    dtype: Annotated[
        str,
        typer.Option("--dtype", help="auto (the base checkpoint's dtype) | float32 | bfloat16 | float16."),
    ] = "auto",
    weights: Annotated[
        str | None,
        typer.Option(
            "--weights", help="One weight per adapter, e.g. 0.7,0.3 (default: equal, summing to 1)."
        ),
    ] = None,
    combination: Annotated[
        str,
        typer.Option(
            "--combination",
            help="How several adapters combine (PEFT add_weighted_adapter): cat (exact weighted sum) | "
            "linear | svd | ties | dare_linear | dare_ties | magnitude_prune | ..._svd.",
        ),
    ] = "cat",
    density: Annotated[
        float | None,
        typer.Option("--density", help="Share of each update kept (ties, dare_*, magnitude_prune)."),
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Replace an OUT that an earlier merge wrote (only once the new one is complete); "
            "any other non-empty folder is refused.",
        ),
    ] = False,
    trust_remote_code: TrustOpt = False,
) -> None:
    """Fold the adapter into the base weights: OUT is a plain transformers model folder."""
    from peftcli.commands.merge import merge as run_merge
    from peftcli.commands.merge import parse_weights

    run_merge(targets, out, dtype, parse_weights(weights), combination, density, overwrite, trust_remote_code)


@app.command()
def export(
    target: Annotated[Path, typer.Argument(help="A run or adapter folder.", show_default=False)],
    to: Annotated[str, typer.Option("--to", help="The format: gguf (llama.cpp, Ollama).")] = "gguf",
    out: Annotated[
        Path, typer.Option("-o", "--out", help="The file to write, e.g. model.gguf.", show_default=False)
    ] = ...,
    kind: Annotated[
        str,
        typer.Option("--type", help="Weight type: f16 | bf16 | q8_0 (8-bit blocks of 32, float16 scales)."),
    ] = "f16",
    overwrite: Annotated[
        bool,
        typer.Option(
            "--force",
            "--overwrite",
            help="Replace an OUT that an earlier export wrote (only once the new file is complete); "
            "any other file is refused.",
        ),
    ] = False,
    trust_remote_code: TrustOpt = False,
) -> None:
    """Merge the adapter and write one file for another runtime: GGUF for llama.cpp and Ollama."""
    from peftcli.commands.export import export as run_export

    run_export(target, to, out, kind, overwrite, trust_remote_code)


@app.command()
def generate(
    target: Annotated[
        Path, typer.Argument(help="A run folder, an adapter folder or a model folder.", show_default=False)
    ],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The prompt.", show_default=False)],
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", min=1, help="Tokens to generate at most.")
    ] = 128,
    temperature: Annotated[
        float, typer.Option("--temperature", min=0.0, help="0 = greedy; above 0, sample at this temperature.")
    ] = 0.0,
    seed: Annotated[int, typer.Option("--seed", min=0, max=2**32 - 1, help="Seed for sampling.")] = 0,
    chat: Annotated[
        bool,
        typer.Option(
            "--chat", help="Render the prompt through the chat template (a chat run does by default)."
        ),
    ] = False,
    raw: Annotated[
        bool, typer.Option("--raw", help="Use the prompt as plain text, even for a run trained on chat data.")
    ] = False,
    system: Annotated[str | None, typer.Option("--system", help="A system message (chat template).")] = None,
    trust_remote_code: TrustOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Continue a prompt with the fine-tuned model (classifiers: the label and class probabilities)."""
    from peftcli.commands.generate import format_result, run_generate

    result = run_generate(
        target, prompt, max_new_tokens, temperature, seed, chat, system, trust_remote_code, raw
    )
    emit(result, json_out, format_result)


@app.command()
def push(
    target: Annotated[
        Path,
        typer.Argument(help="A finished run folder, or a folder `peftcli merge` wrote.", show_default=False),
    ],
    repo_id: Annotated[str, typer.Argument(help="The Hub repo, owner/name.", show_default=False)],
    private: Annotated[
        bool, typer.Option("--private/--public", help="The repo's visibility when push creates it.")
    ] = True,
    merged: Annotated[
        bool, typer.Option("--merged", help="Push a merged model folder (library transformers).")
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Upload to the Hugging Face Hub with its model card; the token is never printed or written."""
    from peftcli.commands.push import push as run_push

    result = run_push(target, repo_id, private, merged)
    emit(result, json_out, lambda r: f"pushed {len(r['files'])} files to {r['url']}")


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
    from peftcli.commands.env import collect, format_env

    emit(collect(), json_out, format_env)


# Typer vendors click; find its exception base without naming a private module.
_ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def main() -> None:
    try:
        code = app(standalone_mode=False)
        if code == 130:  # click turns Ctrl-C outside training into exit status 130, silently
            print("error: interrupted", file=sys.stderr)
        sys.exit(code if isinstance(code, int) else 0)
    except UserError as exc:
        if _state["debug"]:
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(getattr(exc, "exit_code", 2))
    except _ClickException as exc:
        known = {c.name or c.callback.__name__ for c in app.registered_commands}
        command = next((a for a in sys.argv[1:] if a in known), "")
        print(
            f"error: {exc.format_message()} (see `peftcli {command + ' ' if command else ''}--help`)",
            file=sys.stderr,
        )
        sys.exit(2)
    except Interrupted as exc:
        if os.environ.get("PEFTCLI_LAUNCHED"):  # one of `train --num-processes`'s processes:
            sys.exit(0)  # the launching peftcli reports it, once, with the whole command
        how = f"`{exc.command}`" if exc.command else "--resume"
        if exc.checkpoint:
            print(
                f"error: {exc}; the newest checkpoint is {exc.checkpoint}; continue with {how}",
                file=sys.stderr,
            )
        else:  # --resume would start from step 0: say so, and how to keep progress next time
            print(
                f"error: {exc} with no checkpoint saved, so its progress is lost; {how} trains it again "
                "from step 0 (set training.save_every, e.g. training.save_every=50, to keep progress next time)",
                file=sys.stderr,
            )
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
