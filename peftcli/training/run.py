"""`peftcli train`: the run folder, and the stages wired together in order.

recipe → model → method → data → train → adapter + eval. Each stage gets only its own part
of the recipe.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftcli.cards import write_run_card
from peftcli.console import is_main_process, say
from peftcli.errors import Interrupted
from peftcli.methods.coverage import write as write_coverage
from peftcli.model.parts import parameter_counts
from peftcli.objectives import OBJECTIVES
from peftcli.recipe import Recipe
from peftcli.recipe_file import dump_recipe
from peftcli.run_folder import lifecycle as run_folder
from peftcli.run_folder.lock import RunLock
from peftcli.run_folder.plan import fingerprint, plan_folder, resume_point
from peftcli.run_folder.save import save_adapter, write_json
from peftcli.tasks import TASKS
from peftcli.training.accelerator import describe, distribution, make_accelerator, trainable_summary
from peftcli.training.tracking import MetricsLog


@dataclass
class Trained:
    run_dir: Path
    model: Any  # the PeftModel, unwrapped
    tokenizer: Any
    metrics: dict[str, Any]


def train(recipe: Recipe, overwrite: bool = False, resume: bool = False) -> Trained:
    """Train the recipe into its run folder (continuing it from its newest checkpoint with
    `resume`). The main process holds the run's lock from before it looks at the folder until
    it returns."""
    from peftcli.console import quiet_libraries
    from peftcli.training import faults
    from peftcli.validation import validate

    accelerator, restarts = None, 0
    if faults.may_restart():  # a restarted group continues its run: every process agrees first
        quiet_libraries()
        accelerator = make_accelerator(recipe.training, recipe.output_dir)
        if restarts := faults.agreed_restarts(accelerator):
            overwrite, resume = faults.restart_flags(recipe.output_dir, overwrite, resume)
    # Fail fast, before anything heavy is imported or loaded (the folder's location included);
    # say what the method ignores and what the targets leave out (a mixture's experts).
    notes = [
        x
        for x in validate(recipe)
        if x.endswith(": ignored") or x.startswith(("peft: starts from", "warning: "))
    ]
    # The main process (accelerate launch sets RANK; a plain run is rank 0) claims the run
    # before it looks at the folder, and before anything heavy is imported: a second `train`
    # of the same folder is refused at once.
    lock = RunLock(recipe.output_dir) if is_main_process() else None
    try:
        if lock is not None:
            lock.acquire()
        where = plan_folder(recipe.output_dir, overwrite, resume)
        quiet_libraries()
        accelerator = accelerator or make_accelerator(recipe.training, recipe.output_dir)
        return _train(recipe, where, accelerator, notes, restarts)
    finally:
        if lock is not None:
            lock.release()


@dataclass
class Stages:
    """What the stages built for one run: tokenizer, data, the wrapped model, where it resumes,
    and the objective it trains with."""

    tokenizer: Any
    data: Any  # data.Prepared
    model: Any  # the PeftModel
    counts: dict[str, int]
    fingerprint: dict[str, Any]
    start: Path | None  # the checkpoint a resumed run continues from
    objective: Any  # peftcli.objectives.base.Objective: SFT, DPO, ...


def _train(
    recipe: Recipe, where: run_folder.Plan, accelerator: Any, notes: list[str], restarts: int = 0
) -> Trained:
    from peftcli.training import faults

    accelerator.project_configuration.set_directories(str(where.work_dir))
    cause = faults.note_group(accelerator, restarts)
    stages = load_stages(recipe, where, accelerator)
    how = distribution(accelerator)
    # The run folder is made (or reopened) only now that everything it needs has loaded: a
    # recipe, data or model that fails leaves nothing behind.
    if accelerator.is_main_process:
        run_folder.open_run(where, dump_recipe(recipe), stages.start)
        if restarts:
            say(faults.restart_line(restarts, cause, stages.start))
        report_start(recipe, where, stages, notes)
        say(f"peftcli: running on {describe(how)}")
    accelerator.wait_for_everyone()
    log = MetricsLog(where.work.metrics, accelerator, recipe.training.report_to)
    summary = run_loop(recipe, where, stages, log, accelerator)
    summary["distributed"] = {**how, **held(stages.model, accelerator)}
    summary["restarts"] = restarts
    metrics = finish(recipe, where, stages, summary, log, accelerator)
    accelerator.wait_for_everyone()
    # The DDP wrapper (with gloo work it holds) goes before the process group it talks over;
    # left to interpreter exit, gloo's threads can abort the process after a finished run.
    accelerator.free_memory()
    accelerator.end_training()  # closes trackers and the process group
    return Trained(where.run_dir, stages.model, stages.tokenizer, metrics)


def held(model: Any, accelerator: Any) -> dict[str, int]:
    """What each process held of the trained model's parameters (measured: a sharded base is
    split across the processes); a run that asked for FSDP and holds the whole model fails."""
    from peftcli.training.sharded import parameter_bytes

    measured = parameter_bytes(model, accelerator)
    if accelerator.distributed_type.value == "FSDP" and accelerator.num_processes > 1:
        if measured["param_bytes_per_process"] >= measured["param_bytes"]:
            raise RuntimeError(f"FSDP was set up but every process holds the whole model: {measured}")
    return measured


def load_stages(recipe: Recipe, where: run_folder.Plan, accelerator: Any) -> Stages:
    """recipe → model (tokenizer) → data → model weights → method, each with its own section."""
    from accelerate.utils import set_seed

    from peftcli.data.cache import encoding, prepare
    from peftcli.methods.apply import apply_method
    from peftcli.methods.inits import check_sharding, eva
    from peftcli.methods.load import start_from
    from peftcli.model.load import load_model, load_tokenizer
    from peftcli.objectives.build import build_objective
    from peftcli.training.loop import make_loader, plan

    print_ = fingerprint(
        recipe.model_dump(mode="json"), accelerator.num_processes, encoding(recipe.model.task)
    )
    start = resume_point(where.work_dir, print_) if where.continuing else None
    check_sharding(recipe.peft, accelerator.distributed_type.value)
    set_seed(recipe.training.seed)
    task = recipe.model.task
    tokenizer = load_tokenizer(recipe.model)
    with accelerator.main_process_first():  # one process prepares; the others read its cache
        data = prepare(recipe.data, tokenizer, recipe.training.seed, task, recipe.training.objective)
    steps = plan(len(data.train.examples), recipe.training, accelerator.num_processes).total_steps
    model = load_model(recipe.model, device=accelerator.device, labels=data.labels)
    if recipe.peft.init_from is not None:
        model = start_from(model, recipe.peft.init_from, recipe.peft.method)
    else:
        model = apply_method(model, recipe.peft, task, total_steps=steps)
    objective = build_objective(
        recipe.training.objective,
        task,
        tokenizer,
        recipe.eval,
        recipe.preference,
        recipe.peft.init_from is not None,
        recipe.grpo,
    )
    if recipe.peft.init == "eva":  # from the run's first training batches, in the run's order
        used = eva(model, make_loader(data, recipe.training, objective.collate), accelerator.device)
        if accelerator.is_main_process:
            say(f"peftcli: eva: initialised A from the layer inputs of {used} training batches")
    return Stages(tokenizer, data, model, trainable_summary(model), print_, start, objective)


def report_start(recipe: Recipe, where: run_folder.Plan, stages: Stages, notes: list[str]) -> None:
    from peftcli.methods.init_table import variants_set

    if where.continuing:
        say(
            f"peftcli: resuming {where.run_dir} from {stages.start.name}"
            if stages.start
            else f"peftcli: {where.run_dir} has no complete checkpoint; starting it again from step 0"
        )
    for note in notes:
        say(f"peftcli: {note}" if note.startswith("warning: ") else f"peftcli: note: {note}")
    counts, data, s = stages.counts, stages.data, stages.data.stats
    variants = "; ".join(variants_set(recipe.peft))  # init, rslora, LoRA+, rank/alpha patterns
    say(
        f"peftcli: {recipe.peft.method}{f' ({variants})' if variants else ''} on {recipe.model.name_or_path}: "
        f"{counts['trainable_params']:,} trainable of {counts['total_params']:,} parameters "
        f"({100 * counts['trainable_params'] / counts['total_params']:.2f}%)"
    )
    if TASKS[recipe.model.task].vision:  # which parts train, exact
        parts = parameter_counts(stages.model.named_parameters())
        say(
            "peftcli: parts: "
            + ", ".join(f"{p} {c['params']:,} ({c['trainable']:,} trainable)" for p, c in parts.items())
        )
    what = {"preference": "pairs", "unpaired": "answers"}.get(data.format, "examples")
    say(
        f"peftcli: data {data.format}: {len(data.train.examples)} train / "
        f"{len(data.eval.examples) if data.eval else 0} eval {what}, {s['supervised_tokens']:,} of "
        f"{s['tokens']:,} train tokens supervised, {s['truncated']} truncated, {s['dropped']} dropped"
    )
    if not OBJECTIVES[recipe.training.objective].task_loss:
        start = f" from {recipe.peft.init_from}" if recipe.peft.init_from else ""
        say(f"peftcli: objective {recipe.training.objective}{start}")


def evaluator(recipe: Recipe, stages: Stages, accelerator: Any, final: bool = False) -> Any:
    """The evaluation the loop runs every `eval_every` steps (SFT: loss, perplexity) or at the
    end (the recipe's metrics); None without eval data."""
    if stages.data.eval is None:
        return None
    objective, split, batch = stages.objective, stages.data.eval, recipe.training.batch_size
    return lambda model: objective.evaluate(model, split, accelerator, batch, final)


def run_loop(
    recipe: Recipe, where: run_folder.Plan, stages: Stages, log: MetricsLog, accelerator: Any
) -> dict[str, Any]:
    """The training loop, stopped cleanly by Ctrl-C/SIGTERM; a run that fails before its first
    step leaves the folder as it was found."""
    from peftcli.methods.apply import lr_ratios, penalty, step_hook
    from peftcli.training.checkpoint import Checkpointer
    from peftcli.training.loop import Control, fit

    section = recipe.training
    checkpoints = Checkpointer(
        where.work.checkpoints,
        section.save_every,
        section.keep_checkpoints,
        stages.fingerprint,
        accelerator,
        stages.start,
    )
    control = Control()
    data, saved = stages.data, where.work.reference
    splits = {"train": data.train.examples} | ({"eval": data.eval.examples} if data.eval else {})
    stages.objective.prepare(
        stages.model, splits, accelerator, section.batch_size, saved, stages.start is not None
    )
    try:
        with control:
            return fit(
                stages.model,
                stages.data,
                section,
                accelerator,
                stages.objective,
                log,
                evaluate=evaluator(recipe, stages, accelerator),
                on_step=step_hook(recipe.peft),
                penalty=penalty(recipe.peft),
                checkpoints=checkpoints,
                control=control,
                lr_ratios=lr_ratios(recipe.peft),
            )
    except Interrupted:
        raise
    except BaseException:
        if accelerator.is_main_process and control.step == 0 and not where.continuing:
            run_folder.forget(where)  # nothing was trained
        raise


def rendering(recipe: Recipe, data_format: str) -> dict[str, Any]:
    """How the data was rendered, for eval.json: `generate` and `eval --harness` follow it."""
    from peftcli.rendering import data_is_chat

    section = recipe.data.model_copy(update={"format": data_format})
    return {"data_format": data_format, "chat": data_is_chat(section, recipe.model.task)}


def trained_line(summary: dict[str, Any]) -> str:
    """`300 steps in 6.4s`; after a resume the seconds are only this session's, and it says so."""
    steps, seconds, resumed = summary["steps"], summary["seconds"], summary.get("resumed_from") or 0
    if not resumed:
        return f"{steps} steps in {seconds:.1f}s"
    return f"{steps} steps ({steps - resumed} of them in {seconds:.1f}s in this session, resumed from step {resumed})"


def finish(
    recipe: Recipe,
    where: run_folder.Plan,
    stages: Stages,
    summary: dict[str, Any],
    log: MetricsLog,
    accelerator: Any,
) -> dict[str, Any]:
    """Training is done: the adapter, tokenizer and run files are written before anything else
    (evaluation, plots), so no later failure costs the trained adapter. Returns the metrics."""
    from peftcli.methods.inits import save_pretrained
    from peftcli.training.sharded import adapter_state
    from peftcli.training.tracking import plot_losses

    main, run_dir = accelerator.is_main_process, where.run_dir
    result = {"train": {**summary, **stages.counts, **rendering(recipe, stages.data.format)}}
    gathered = adapter_state(stages.model)  # every process: a sharded adapter is gathered whole
    if main:
        save_adapter(
            save_pretrained,
            accelerator.unwrap_model(stages.model),
            stages.tokenizer,
            stages.data.labels,
            where.work.adapter,
            gathered,
        )
        write_json(where.work.results, result)
        run_folder.finish(where)
        write_run_card(run_dir)  # replaces PEFT's own adapter/README.md
        log.path = where.run.metrics  # an --overwrite run's folder was just renamed
        say(f"peftcli: saved {where.run.adapter} (load with PeftModel.from_pretrained)")
    accelerator.wait_for_everyone()
    try:
        if main:  # what the adapter reaches, per kind of parameter: coverage.json
            write_coverage(where.run.coverage, accelerator.unwrap_model(stages.model))
        final = evaluator(recipe, stages, accelerator, final=True)
        metrics = final(stages.model) if final else {}
        floats = {k: v for k, v in metrics.items() if isinstance(v, float)}
        if floats:
            row = {
                "step": summary["steps"],
                "epoch": summary["epochs"],
                **{f"eval_{k}": v for k, v in floats.items()},
            }
            log.log(row)
        if main:
            write_json(where.run.results, {**metrics, **result})
            write_run_card(run_dir)  # now with the final metrics
            plot_losses(where.run.metrics, where.run.plot, title=f"{recipe.name} ({recipe.peft.method})")
            shown = ", ".join(f"{k} {v:.4f}" for k, v in floats.items())
            say(f"peftcli: {trained_line(summary)}; eval: {shown or 'none'}")
    except BaseException:
        if main:
            say(
                f"peftcli: training finished and its adapter is saved in {where.run.adapter}; what failed "
                f"came after it (evaluate it again with `peftcli eval {run_dir}`)"
            )
        raise
    return metrics
