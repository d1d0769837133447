"""`peftcli eval`, `merge`, `export`, `generate` and `push`: what is done with a trained adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from peftcli.cli_app import JsonOpt, TrustOpt, app
from peftcli.console import emit


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
    image: Annotated[
        list[Path] | None,
        typer.Option(
            "--image", help="An image shown before the prompt (vision-language models; repeatable)."
        ),
    ] = None,
    trust_remote_code: TrustOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Continue a prompt with the fine-tuned model (classifiers: the label and class probabilities)."""
    from peftcli.commands.generate import format_result, run_generate

    result = run_generate(
        target, prompt, max_new_tokens, temperature, seed, chat, system, trust_remote_code, raw, image or []
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
