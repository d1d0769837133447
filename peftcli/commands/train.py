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
    from peftcli.recipe import load_recipe
    from peftcli.training.run import check_can_start, train

    recipe = load_recipe(recipe_path, overrides)
    flags = [f for f, on in (("--resume", resume), ("--overwrite", overwrite)) if on]
    if num_processes is not None or launch_config is not None:
        from peftcli.checks import check_recipe

        check_can_start(recipe, overwrite, resume)  # refuse before starting processes
        check_recipe(recipe)
        return launch(recipe_path, overrides or [], num_processes, launch_config, flags)
    try:
        train(recipe, overwrite=overwrite, resume=resume)
    except Interrupted as exc:
        exc.command = shlex.join(["peftcli", "train", str(recipe_path), *(overrides or []), "--resume"])
        raise
    return 0


# --------------------------------------------------------------------------- the launcher


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
    return subprocess.run(cmd, env=env).returncode
