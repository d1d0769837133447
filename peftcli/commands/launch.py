"""`peftcli train --num-processes N | --launch-config FILE`: the same run, started by
Accelerate's launcher (`accelerate launch -m peftcli.cli train ...` is equivalent).

Without a launch config, N processes on one machine are started through
`torch.distributed.run` (Accelerate's `--multi_gpu` launcher); on a machine without GPUs
peftcli's Accelerator then runs them on the CPU over gloo.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from peftcli.errors import UserError


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
