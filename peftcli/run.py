"""`peftcli train`: the run folder, and the stages wired together in order.

recipe → model → method → data → train → adapter + eval. Each stage gets only its own part
of the recipe.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError
from .recipe import Recipe, TrainingSection, dump_recipe

INCOMPLETE = ".incomplete"
LABELS_FILE = "labels.json"


def say(message: str) -> None:
    """Progress for humans: stderr, so `--json` stdout stays clean."""
    print(message, file=sys.stderr, flush=True)


def is_run(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def choose_work_dir(run_dir: Path, overwrite: bool, resume: bool) -> tuple[Path, bool]:
    """Where this run writes, and whether it continues the run there.

    An existing finished run is never written into: with `--overwrite` the new run is built
    beside it and swapped in only when it has finished. `--resume` continues an unfinished
    run in place."""
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other", "pick one")
    if not is_run(run_dir):
        return run_dir, False
    unfinished = (run_dir / INCOMPLETE).exists()
    if resume:
        if not unfinished:
            raise UserError(
                f"{run_dir} holds a finished run; there is nothing to resume",
                "pass --overwrite to train it again",
            )
        return run_dir, True
    if not overwrite:
        state = "an unfinished run" if unfinished else "a run"
        hint = "pass --resume to continue it, " if unfinished else "pass "
        raise UserError(
            f"{run_dir} already holds {state}",
            f"{hint}--overwrite to replace it, or set training.output_dir / name",
        )
    return run_dir.with_name(f".{run_dir.name}.partial"), False


def resume_point(run_dir: Path, fingerprint_: dict[str, Any]) -> Path | None:
    """The newest complete checkpoint, refusing one made under a different recipe or data."""
    from .checkpoint import differences, latest, read_state

    checkpoint = latest(run_dir / "checkpoints")
    if checkpoint is None:
        return None
    changes = differences(read_state(checkpoint)["fingerprint"], fingerprint_)
    if changes:
        raise UserError(
            f"cannot resume {run_dir} from {checkpoint.name}: " + "; ".join(changes),
            "restore the original recipe and data, or pass --overwrite to start again",
        )
    return checkpoint


def keep_metrics_until(path: Path, step: int) -> None:
    """Drop rows a killed run logged after its last checkpoint: each step appears once."""
    if path.is_file():
        rows = [
            line
            for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line)["step"] <= step
        ]
        path.write_text("".join(r + "\n" for r in rows), encoding="utf-8")


def finish_work_dir(work_dir: Path, run_dir: Path) -> None:
    (work_dir / INCOMPLETE).unlink(missing_ok=True)
    if work_dir == run_dir:
        return
    trash = run_dir.with_name(f".{run_dir.name}.old")
    shutil.rmtree(trash, ignore_errors=True)
    os.rename(run_dir, trash)
    os.rename(work_dir, run_dir)
    shutil.rmtree(trash, ignore_errors=True)


def make_accelerator(section: TrainingSection, project_dir: Path) -> Any:
    import torch
    from accelerate import Accelerator, DataLoaderConfiguration

    precision = section.mixed_precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    if precision == "fp16" and not torch.cuda.is_available():
        raise UserError("training.mixed_precision: fp16 needs a CUDA GPU", "use bf16 or no on CPU")
    trackers = [t for t in section.report_to if t != "jsonl"]
    return Accelerator(
        # Without a GPU, processes started by a launcher talk over gloo.
        cpu=not torch.cuda.is_available(),
        mixed_precision=precision,
        log_with=trackers or None,
        project_dir=str(project_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )


def trainable_summary(model: Any) -> dict[str, int]:
    trainable, total = model.get_nb_trainable_parameters()
    return {"trainable_params": int(trainable), "total_params": int(total)}


@dataclass
class Trained:
    run_dir: Path
    model: Any  # the PeftModel, unwrapped
    tokenizer: Any
    metrics: dict[str, Any]


def train(recipe: Recipe, overwrite: bool = False, resume: bool = False) -> Trained:
    """Train the recipe into its run folder (continuing it from its newest checkpoint with
    `resume`)."""
    from accelerate.utils import set_seed

    from . import data as data_stage
    from .checkpoint import Checkpointer, fingerprint, read_state
    from .checks import check_recipe
    from .evaluate import evaluate
    from .methods import apply_method, penalty, step_hook
    from .model import load_model, load_tokenizer, quiet_libraries
    from .tracking import MetricsLog, plot_losses
    from .train import fit, plan

    run_dir = recipe.output_dir
    work_dir, continuing = choose_work_dir(run_dir, overwrite, resume)
    # Fail fast, before anything heavy is imported or loaded; say what the method ignores.
    notes = [line for line in check_recipe(recipe) if line.endswith(": ignored")]
    quiet_libraries()
    accelerator = make_accelerator(recipe.training, work_dir)
    main = accelerator.is_main_process
    print_ = fingerprint(recipe.model_dump(mode="json"), accelerator.num_processes)
    start = resume_point(work_dir, print_) if continuing else None
    if main:
        if work_dir != run_dir:  # leftovers of an earlier interrupted --overwrite
            shutil.rmtree(work_dir, ignore_errors=True)
        work_dir.mkdir(parents=True, exist_ok=True)
        (work_dir / INCOMPLETE).touch()
        (work_dir / "recipe.yaml").write_text(dump_recipe(recipe), encoding="utf-8")
        step = read_state(start)["step"] if start else 0
        keep_metrics_until(work_dir / "metrics.jsonl", step)
        if continuing:
            say(
                f"peftcli: resuming {run_dir} from {start.name}"
                if start
                else f"peftcli: {run_dir} has no complete checkpoint; starting it again from step 0"
            )
    accelerator.wait_for_everyone()
    set_seed(recipe.training.seed)

    task = recipe.model.task
    tokenizer = load_tokenizer(recipe.model)
    with accelerator.main_process_first():  # one process prepares; the others read its cache
        data = data_stage.prepare(recipe.data, tokenizer, recipe.training.seed, task)
    steps = plan(len(data.train.examples), recipe.training, accelerator.num_processes).total_steps
    model = load_model(recipe.model, device=accelerator.device, labels=data.labels)
    model = apply_method(model, recipe.peft, task, total_steps=steps)
    counts = trainable_summary(model)
    if main:
        for note in notes:
            say(f"peftcli: note: {note}")
        s = data.stats
        say(
            f"peftcli: {recipe.peft.method} on {recipe.model.name_or_path}: "
            f"{counts['trainable_params']:,} trainable of {counts['total_params']:,} parameters "
            f"({100 * counts['trainable_params'] / counts['total_params']:.2f}%)"
        )
        say(
            f"peftcli: data {data.format}: {len(data.train.examples)} train / "
            f"{len(data.eval.examples) if data.eval else 0} eval examples, {s['supervised_tokens']:,} of "
            f"{s['tokens']:,} train tokens supervised, {s['truncated']} truncated, {s['dropped']} dropped"
        )

    log = MetricsLog(work_dir / "metrics.jsonl", accelerator, recipe.training.report_to)
    batch = recipe.training.batch_size
    pad_id = tokenizer.pad_token_id

    def run_eval(m: Any, final: bool = False) -> dict[str, Any]:
        metrics = ["loss", "perplexity"] if not final else None
        section = recipe.eval if final else recipe.eval.model_copy(update={"metrics": metrics})
        return evaluate(m, tokenizer, data.eval, section, task, accelerator, batch)

    summary = fit(
        model,
        data,
        recipe.training,
        accelerator,
        pad_id,
        task,
        log,
        evaluate=run_eval if data.eval else None,
        on_step=step_hook(recipe.peft),
        penalty=penalty(recipe.peft),
        checkpoints=Checkpointer(
            work_dir / "checkpoints",
            recipe.training.save_every,
            recipe.training.keep_checkpoints,
            print_,
            accelerator,
            start,
        ),
    )
    eval_metrics = run_eval(model, final=True) if data.eval else {}
    if eval_metrics:
        log.log(
            {
                "step": summary["steps"],
                "epoch": summary["epochs"],
                **{f"eval_{k}": v for k, v in eval_metrics.items() if isinstance(v, float)},
            }
        )
    if main:
        accelerator.unwrap_model(model).save_pretrained(work_dir / "adapter")
        tokenizer.save_pretrained(work_dir / "adapter")
        if data.labels:  # class names, in the order of the classifier's outputs
            (work_dir / "adapter" / LABELS_FILE).write_text(json.dumps(data.labels) + "\n", encoding="utf-8")
        result = {**eval_metrics, "train": {**summary, **counts}}
        (work_dir / "eval.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        plot_losses(
            work_dir / "metrics.jsonl", work_dir / "loss.png", title=f"{recipe.name} ({recipe.peft.method})"
        )
        finish_work_dir(work_dir, run_dir)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items() if isinstance(v, float))
        say(f"peftcli: {summary['steps']} steps in {summary['seconds']:.1f}s; eval: {shown or 'none'}")
        say(f"peftcli: saved {run_dir}/adapter (load with PeftModel.from_pretrained)")
    accelerator.wait_for_everyone()
    accelerator.end_training()  # closes trackers and the process group
    return Trained(run_dir, accelerator.unwrap_model(model), tokenizer, eval_metrics)
