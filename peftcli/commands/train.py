"""`peftcli train`: one run in this process, or — with `--num-processes N | --launch-config FILE` —
the same run started by Accelerate's launcher (`accelerate launch -m peftcli.cli train ...` is
equivalent; peftcli.training.launch starts it and reports how a failed group ended).
"""

from __future__ import annotations

import shlex
import signal
from pathlib import Path

from peftcli.errors import Interrupted, UserError


def run_train(
    recipe_path: Path,
    overrides: list[str] | None,
    resume: bool = False,
    overwrite: bool = False,
    num_processes: int | None = None,
    launch_config: Path | None = None,
    max_restarts: int = 0,
    join_timeout: int | None = None,
) -> int:
    """Train the recipe; returns the exit status. An interrupted run leaves `Interrupted` carrying
    the command that resumes it."""
    from peftcli.recipe_file import load_recipe
    from peftcli.training.run import train

    recipe = load_recipe(recipe_path, overrides)
    flags = [f for f, on in (("--resume", resume), ("--overwrite", overwrite)) if on]
    if num_processes is not None or launch_config is not None:
        from peftcli.run_folder.plan import check_can_start
        from peftcli.training import launch
        from peftcli.validation import validate

        # Refused before any process starts; each launched process validates its own copy.
        validate(recipe, launch_config)
        check_can_start(recipe, overwrite, resume)
        how = launch.Launch(
            recipe_path, [*(overrides or []), *flags], num_processes, launch_config, max_restarts
        )
        how.join_timeout = join_timeout or launch.JOIN_TIMEOUT
        if launch_config is not None:
            how.cluster = launch.read_config(launch_config)
        launched = {"--num-processes": num_processes, "--launch-config": launch_config}
        used = [x for flag, value in launched.items() if value is not None for x in (flag, str(value))]
        code = launch.launch(how)
        if (stopped := interrupted_run(recipe.output_dir, code)) is not None:
            stopped.command = again_command(stopped, recipe_path, [*(overrides or []), *used], overwrite)
            raise stopped
        return code
    if max_restarts or join_timeout:
        raise UserError("--max-restarts and --join-timeout need --num-processes or --launch-config")
    from peftcli.training.faults import reported

    try:
        with reported():  # a launched process that lost a peer: its launcher says so, once
            train(recipe, overwrite=overwrite, resume=resume)
    except Interrupted as exc:
        exc.command = again_command(exc, recipe_path, overrides or [], overwrite)
        raise
    return 0


def again_command(stopped: Interrupted, recipe_path: Path, args: list[str], overwrite: bool) -> str:
    """The command that goes on after an interruption: `--resume` from its checkpoint; without
    one, the command that trains it again from step 0 (an --overwrite run's unfinished twin
    holds nothing to resume, so that is --overwrite again)."""
    flag = "--overwrite" if stopped.checkpoint is None and overwrite else "--resume"
    return shlex.join(["peftcli", "train", str(recipe_path), *args, flag])


def interrupted_run(run_dir: Path, code: int) -> Interrupted | None:
    """After a launched run: the interruption to report, or None when it finished or failed."""
    from peftcli.run_folder.layout import Layout, is_unfinished, latest, read_state

    if code not in (0, 130, 143):
        return None
    for folder in (Layout(run_dir).partial, run_dir):
        if folder.is_dir() and is_unfinished(folder):
            checkpoint = latest(Layout(folder).checkpoints)
            step = read_state(checkpoint)["step"] if checkpoint else None
            return Interrupted(step, code - 128 if code else signal.SIGTERM, checkpoint)
    return None
