"""`peftcli compare`: train several methods on one recipe — same model, data, steps and seed —
and tabulate what each costs and what it reaches.

Each method trains in its own subprocess (`python -m peftcli.commands.compare RECIPE OVERRIDES_JSON`),
through the same `peftcli.training.run.train` as `peftcli train`, into `<DIR>/<method>/`. A process of
its own is what makes the peak-memory column honest: on CPU it is the process's peak resident
set (`getrusage` ru_maxrss: Python, libraries, weights, data and training together); on a GPU
it is `torch.cuda.max_memory_allocated`. The table is written as `compare.csv`, `compare.md`
and `compare.png` in DIR.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from peftcli import outputs
from peftcli.console import human_bytes, say
from peftcli.errors import UserError, did_you_mean
from peftcli.methods import METHODS, canonical_method
from peftcli.recipe_file import load_recipe
from peftcli.run_folder.layout import Layout, adapter_file, read_metrics
from peftcli.run_folder.lock import writable
from peftcli.run_folder.plan import protected_paths

RESULT_ENV = "PEFTCLI_COMPARE_RESULT"  # where a worker writes its JSON result
TASK_METRICS = ("exact_match", "accuracy", "preference_accuracy", "reward_accuracy", "reward")  # reward: grpo
COLUMNS = [
    "method",
    "variants",  # peft.init, rslora, LoRA+, rank/alpha patterns: what the recipe adds to the method
    "trainable_params",
    "share",
    "tokens_per_s",
    "peak_memory_bytes",
    "adapter_bytes",
    "eval_loss",
    *TASK_METRICS,
    "mergeable",
    "steps",
    "seconds",
    "error",
]


def parse_methods(spec: str) -> list[str]:
    """`lora,ia3,prompt_tuning` → canonical names; `all` = every method. Unknown names are
    refused here, before anything trains."""
    if spec.strip().lower() == "all":
        return list(METHODS)
    names = [canonical_method(s) for s in spec.split(",") if s.strip()]
    if not names:
        raise UserError(
            "--methods: no method given", "e.g. --methods lora,ia3 (or all); see `peftcli methods`"
        )
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise UserError(
            f"--methods: unknown method `{unknown[0]}`{did_you_mean(unknown[0], METHODS)}",
            f"choose from {', '.join(METHODS)} (or all)",
        )
    if len(set(names)) != len(names):
        raise UserError(f"--methods: `{next(n for n in names if names.count(n) > 1)}` is listed twice")
    return names


def method_overrides(overrides: list[str], method: str, run_dir: Path, max_steps: int | None) -> list[str]:
    """The user's overrides, then what compare sets. Applied to the raw YAML, so a method's own
    defaults (VeRA's r=64, say) still apply wherever the recipe leaves a key unset."""
    extra = [f"peft.method={method}", f"training.output_dir={run_dir}"]
    if max_steps is not None:
        extra.append(f"training.max_steps={max_steps}")
    return [*overrides, *extra]


def compare(
    recipe_path: Path,
    overrides: list[str],
    methods: list[str],
    max_steps: int | None = None,
    output_dir: Path | None = None,
    overwrite: bool = False,
    harness: str | None = None,
    harness_args: str | None = None,
) -> tuple[list[dict[str, Any]], Path]:
    """Train every method; returns the table's rows and the folder they were written to. With
    `harness`, each trained run is also scored by lm-evaluation-harness (its eval.json keeps
    the results, as `peftcli eval RUN --harness` would) and the table gains a column per task
    and metric."""
    from peftcli.validation import validate

    if max_steps is not None and max_steps < 1:
        raise UserError(f"--max-steps: {max_steps} must be at least 1")
    if harness_args is not None and harness is None:
        raise UserError("--harness-args needs --harness TASKS")
    if harness is not None:  # lm-eval, its arguments and its tasks are checked before anything trains
        from peftcli.harness import check_harness

        check_harness(harness, harness_args)
    base = load_recipe(recipe_path, overrides)  # recipe mistakes end here, before anything trains
    out = Path(output_dir) if output_dir else Path("runs") / f"{base.name}-compare"
    # The folder follows the rule of every peftcli output (peftcli.outputs): new, empty, or an
    # earlier compare's with --overwrite; its runs are replaced by train's own rule.
    hint = "choose another --output-dir"
    outputs.check_location(out, "--output-dir", protected_paths(base), hint=hint, reader="the recipe")
    outputs.check_replace(out, "compare", "--output-dir", overwrite, hint=hint)
    writable(out)
    outputs.mark(out, "compare")
    rows = []
    for i, method in enumerate(methods, 1):
        say(f"peftcli compare: [{i}/{len(methods)}] {method}")
        these = method_overrides(overrides, method, out / method, max_steps)
        try:
            recipe = load_recipe(recipe_path, these)
            validate(recipe)  # a method that cannot work here is a row, found in a second
        except UserError as exc:
            say(f"peftcli compare: {method}: {exc}")
            rows.append(error_row(method, str(exc)))
            continue
        rows.append(run_method(recipe_path, these, method, out / method, overwrite, recipe.eval.metrics))
        if harness is not None and not rows[-1]["error"]:
            rows[-1].update(harness_cells(out / method, harness, harness_args))
    write_outputs(rows, out, title=f"{base.name}: {base.model.name_or_path}")
    return rows, out


def error_row(method: str, message: str) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys([*COLUMNS, "memory_kind"])
    row.update(method=method, mergeable=METHODS[method].merges, error=message)
    return row


def run_method(
    recipe_path: Path, overrides: list[str], method: str, run_dir: Path, overwrite: bool, metrics: list[str]
) -> dict[str, Any]:
    """Train one method in a subprocess; its output is relayed to stderr as it comes."""
    result_path = run_dir.with_name(f".{run_dir.name}.compare.json")
    result_path.parent.mkdir(parents=True, exist_ok=True)
    result_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "peftcli.commands.compare", str(recipe_path), json.dumps(overrides)]
    if overwrite:
        cmd.append("--overwrite")
    env = {**os.environ, RESULT_ENV: str(result_path)}
    # stdout too goes to our stderr, so that `compare --json` keeps stdout for its one document.
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stderr.write(line)
            sys.stderr.flush()
    result = json.loads(result_path.read_text()) if result_path.is_file() else {}
    result_path.unlink(missing_ok=True)
    if "error" in result:
        return error_row(method, result["error"])
    if proc.returncode != 0 or not result:
        return error_row(method, f"crashed (exit status {proc.returncode}); see the traceback above")
    return method_row(method, run_dir, result, metrics)


def method_row(method: str, run_dir: Path, result: dict[str, Any], metrics: list[str]) -> dict[str, Any]:
    run = Layout(run_dir)
    evals = run.read_results()
    train = evals["train"]
    speeds = [r["tokens_per_s"] for r in read_metrics(run.metrics) if "loss" in r]
    row = error_row(method, "")
    row.update(
        variants=run_variants(run_dir),
        trainable_params=train["trainable_params"],
        share=train["trainable_params"] / train["total_params"],
        # The median logged window: robust to the first (warm-up) window and to windows that
        # include an evaluation.
        tokens_per_s=round(statistics.median(speeds), 1) if speeds else None,
        peak_memory_bytes=result["peak_memory_bytes"],
        memory_kind=result["memory_kind"],
        adapter_bytes=adapter_file(run.adapter, weights=True).stat().st_size,
        eval_loss=evals.get("loss"),
        steps=train["steps"],
        seconds=train["seconds"],
        error=None,
    )
    for name in TASK_METRICS:
        row[name] = evals.get(name) if name in metrics else None
    return row


def run_variants(run_dir: Path) -> str:
    import yaml

    from peftcli.methods.init_table import variants_set
    from peftcli.recipe import PeftSection

    peft = yaml.safe_load(Layout(run_dir).recipe.read_text(encoding="utf-8"))["peft"]
    return "; ".join(variants_set(PeftSection.model_validate(peft, strict=False)))


def harness_cells(run_dir: Path, tasks: str, args: str | None) -> dict[str, Any]:
    """`harness:TASK:METRIC` cells of one trained run (lm-eval's standard errors left out)."""
    from peftcli.harness import run_harness
    from peftcli.target import open_target

    try:
        results = run_harness(open_target(run_dir), tasks, args)
    except UserError as exc:  # a method lm-eval cannot score: the row says so, the others go on
        say(f"peftcli compare: {run_dir.name}: harness: {exc}")
        return {"error": f"harness: {exc}"}
    return {
        f"harness:{task}:{metric}": value
        for task, metrics in results.items()
        for metric, value in metrics.items()
        if metric != "samples" and not metric.endswith("_stderr")
    }


# --------------------------------------------------------------------------- output


def _human(value: Any, column: str) -> str:
    if value is None:
        return "-"
    if column == "share":
        return f"{100 * value:.3f}%"
    if column.endswith("_bytes"):
        return human_bytes(value)
    if column == "mergeable":
        return "yes" if value else "no"
    if isinstance(value, float):
        scores = column in ("eval_loss", *TASK_METRICS) or column.startswith("harness:")
        return f"{value:.4f}" if scores else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def harness_columns(rows: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(k for r in rows for k in r if k.startswith("harness:")))


def shown_columns(rows: list[dict[str, Any]]) -> list[str]:
    """Task metrics and the error column only where some row has them; harness columns after
    the task metrics."""
    optional = (*TASK_METRICS, "variants", "error")
    shown = [c for c in COLUMNS if c not in optional or any(r.get(c) not in (None, "") for r in rows)]
    at = shown.index("mergeable")
    return shown[:at] + harness_columns(rows) + shown[at:]


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table for the terminal; errors on their own lines below it."""
    columns = [c for c in shown_columns(rows) if c != "error"]
    cells = [[_human(r.get(c), c) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(columns, widths, strict=True))
        )
    ]
    for row in cells:
        lines.append(
            "  ".join(
                v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    lines += [f"{r['method']}: error: {r['error']}" for r in rows if r.get("error")]
    return "\n".join(lines)


def format_markdown(rows: list[dict[str, Any]]) -> str:
    columns = shown_columns(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for r in rows:
        cells = [_human(r.get(c), c).replace("|", "\\|") if c != "method" else f"`{r[c]}`" for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(rows: list[dict[str, Any]], out: Path, title: str) -> None:
    """The table as CSV, Markdown and a chart; each file appears whole or not at all."""
    table = io.StringIO(newline="")
    fields = [*COLUMNS[:-1], *harness_columns(rows), COLUMNS[-1]]
    writer = csv.DictWriter(table, fieldnames=fields)
    writer.writeheader()
    writer.writerows([{c: ("" if r.get(c) is None else r[c]) for c in fields} for r in rows])
    outputs.write_text(out / "compare.csv", table.getvalue())
    outputs.write_text(out / "compare.md", format_markdown(rows))
    chart = out / f".compare.png.tmp-{os.getpid()}.png"
    plot(rows, chart, title)
    chart.replace(out / "compare.png")


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """One horizontal bar chart per measure, methods on a shared axis, failed methods marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("eval_loss", "eval loss (lower is better)", False),
        ("trainable_params", "trainable parameters (log scale)", True),
        ("tokens_per_s", "training tokens/s", False),
        ("peak_memory_bytes", "peak memory (MiB)", False),
    ]
    metric = next((m for m in TASK_METRICS if any(r.get(m) is not None for r in rows)), None)
    if metric:
        panels.insert(1, (metric, f"{metric.replace('_', ' ')} (higher is better)", False))
    names = [r["method"] for r in rows]
    height = 1.2 + 0.32 * len(rows)
    fig, axes = plt.subplots(1, len(panels), figsize=(3.1 * len(panels), height), sharey=True, dpi=110)
    ys = range(len(rows))
    for ax, (key, label, log) in zip(axes, panels, strict=True):
        values = [r.get(key) for r in rows]
        scale = 1 / 2**20 if key.endswith("_bytes") else 1
        shown = [v * scale if isinstance(v, int | float) and math.isfinite(v) else 0 for v in values]
        colors = ["tab:blue" if r["mergeable"] else "tab:orange" for r in rows]
        ax.barh(ys, shown, color=colors)
        for y, (v, r) in enumerate(zip(values, rows, strict=True)):
            if r.get("error"):  # x in axes coordinates: visible on a log scale too
                ax.text(
                    0.01,
                    y,
                    "failed",
                    va="center",
                    fontsize=8,
                    color="tab:red",
                    transform=ax.get_yaxis_transform(),
                )
            elif v is not None:
                ax.text(shown[y], y, f" {_human(v, key)}", va="center", fontsize=7)
        if log and any(s > 0 for s in shown):
            ax.set_xscale("log")
        ax.set_title(label, fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
        ax.margins(x=0.35)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(list(ys), names, fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle(f"{title} — blue: merges into the base, orange: does not", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------- worker


def worker(argv: list[str]) -> int:
    """One method's run, in its own process; writes its result (or its user error) as JSON."""
    import resource

    from peftcli.training.run import train

    recipe_path, overrides = Path(argv[0]), json.loads(argv[1])
    result_path = Path(os.environ[RESULT_ENV])
    try:
        train(load_recipe(recipe_path, overrides), overwrite="--overwrite" in argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        result_path.write_text(json.dumps({"error": str(exc)}))
        return 2
    import torch

    if torch.cuda.is_available():
        peak, kind = torch.cuda.max_memory_allocated(), "cuda_max_memory_allocated"
    else:  # Linux reports ru_maxrss in KiB
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cpu_peak_rss"
    result_path.write_text(json.dumps({"peak_memory_bytes": peak, "memory_kind": kind}))
    return 0


if __name__ == "__main__":
    sys.exit(worker(sys.argv[1:]))
