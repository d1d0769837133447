"""`peftcli train`: one run in this process, or — with `--num-processes N | --launch-config FILE` —
the same run started by Accelerate's launcher (`accelerate launch -m peftcli.cli train ...` is
equivalent).

Without a launch config, N processes on one machine are started through
`torch.distributed.run` (Accelerate's `--multi_gpu` launcher); on a machine without GPUs
peftcli's Accelerator then runs them on the CPU over gloo.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

from peftcli.errors import Interrupted, UserError


def run_train(
    recipe_path: Path,
    overrides: list[str] | None,
    resume: bool = False,
    overwrite: bool = False,
    num_processes: int | None = None,
    launch_config: Path | None = None,
) -> int:
    """Train the recipe; returns the exit status. An interrupted run leaves `Interrupted` carrying
    the command that resumes it."""
    from peftcli.recipe_file import load_recipe
    from peftcli.training.run import check_can_start, train

    recipe = load_recipe(recipe_path, overrides)
    flags = [f for f, on in (("--resume", resume), ("--overwrite", overwrite)) if on]
    if num_processes is not None or launch_config is not None:
        from peftcli.checks import check_recipe

        check_can_start(recipe, overwrite, resume)  # refuse before starting processes
        check_recipe(recipe)
        if launch_config is not None and launch_config.is_file():
            from peftcli.model.load import resolve_dtype
            from peftcli.training.accelerator import check_launch_config

            model, method = recipe.model, recipe.peft.method
            check_launch_config(
                launch_config, recipe.training, method, model.quantization, resolve_dtype(model)
            )
        launched = {"--num-processes": num_processes, "--launch-config": launch_config}
        how = [x for flag, value in launched.items() if value is not None for x in (flag, str(value))]
        code = launch(recipe_path, overrides or [], num_processes, launch_config, flags)
        if (stopped := interrupted_run(recipe.output_dir, code)) is not None:
            stopped.command = again_command(stopped, recipe_path, [*(overrides or []), *how], overwrite)
            raise stopped
        return code
    try:
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


# --------------------------------------------------------------------------- the launcher

FORWARDED = (signal.SIGINT, signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(
    recipe: Path, overrides: list[str], num_processes: int | None, config: Path | None, flags: list[str]
) -> list[str]:
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if config is not None:
        if not config.is_file():
            raise UserError(f"--launch-config: file not found: {config}")
        cmd += ["--config_file", str(config)]
        if num_processes:
            cmd += ["--num_processes", str(num_processes)]
    else:
        cmd += [
            "--num_processes",
            str(num_processes),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(free_port()),
        ]
        if num_processes and num_processes > 1:
            cmd.append("--multi_gpu")
    return [*cmd, "-m", "peftcli.cli", "train", str(recipe), *overrides, *flags]


def launch(
    recipe: Path, overrides: list[str], num_processes: int | None, config: Path | None, flags: list[str]
) -> int:
    if num_processes is not None and num_processes < 1:
        raise UserError(f"--num-processes must be at least 1, not {num_processes}")
    cmd = launch_command(recipe, overrides, num_processes, config, flags)
    env = {**os.environ, "PEFTCLI_LAUNCHED": "1"}
    print("peftcli: launching " + " ".join(cmd[1:]), file=sys.stderr, flush=True)
    # The launcher runs in a session of its own, so a Ctrl-C reaches this process only: it is
    # passed to the training processes themselves, which finish their step, checkpoint and end;
    # the launcher sees them end normally (a signal to it would abort them with a traceback).
    process = subprocess.Popen(cmd, env=env, start_new_session=True)
    asked: list[int] = []

    def stop(signum: int, frame: object) -> None:
        if asked and signum == signal.SIGINT:  # a second Ctrl-C: stop at once
            os.killpg(process.pid, signal.SIGKILL)
        asked.append(signum)
        for pid in training_processes(process.pid):
            os.kill(pid, signum)

    handlers = {sig: signal.signal(sig, stop) for sig in FORWARDED}
    try:
        code = process.wait()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return 128 + asked[0] if asked else code


def training_processes(launcher: int) -> list[int]:
    """The launcher's descendants that run peftcli (Linux /proc; elsewhere the launcher itself)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return [launcher]
    from peftcli.home import proc_stat

    parents = {int(p.name): int(fields[1]) for p in proc.glob("[0-9]*") if (fields := proc_stat(p.name))}
    family, grew = {launcher}, True
    while grew:
        more = {pid for pid, parent in parents.items() if parent in family} - family
        family |= more
        grew = bool(more)
    found = []
    for pid in family - {launcher}:
        try:
            if b"peftcli.cli" in (proc / str(pid) / "cmdline").read_bytes():
                found.append(pid)
        except OSError:
            continue
    return found


def interrupted_run(run_dir: Path, code: int) -> Interrupted | None:
    """After a launched run: the interruption to report, or None when it finished or failed."""
    from peftcli.runs import is_unfinished, partial_of
    from peftcli.training.checkpoint import latest, read_state

    if code not in (0, 130, 143):
        return None
    for folder in (partial_of(run_dir), run_dir):
        if folder.is_dir() and is_unfinished(folder):
            checkpoint = latest(folder / "checkpoints")
            step = read_state(checkpoint)["step"] if checkpoint else None
            return Interrupted(step, code - 128 if code else signal.SIGTERM, checkpoint)
    return None
