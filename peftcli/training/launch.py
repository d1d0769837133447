"""Starting a run's processes with Accelerate's launcher, and saying in one line how a group
that lost a process or a machine ended.

Without a launch config, N processes on one machine are started through `torch.distributed.run`
(Accelerate's `--multi_gpu` launcher); on a machine without GPUs peftcli's Accelerator then runs
them on the CPU over gloo. A launch config for several machines rendezvous statically (rank =
machine_rank), or, with `--max-restarts`, through torch's elastic c10d rendezvous, which lets
the launchers restart the group together.

What the launcher prints is passed through as it comes, except what a failing group prints
(tracebacks of every process, torch's elastic logs): that is held back until peftcli knows
whether it can say what happened in one line (`--debug` shows everything).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftcli.errors import GroupFailed, UserError
from peftcli.training import faults

FORWARDED = (signal.SIGINT, signal.SIGTERM)
JOIN_TIMEOUT = 900  # seconds; torch's own static rendezvous gave up after 901 s
NOISE = re.compile(r"^(\[rank\d+\]:|[WE]\d{4} \d\d:|Traceback \(most recent call last\))")
FAILED = re.compile(r"failed \(exitcode: (-?\d+)\) local_rank: (\d+) \(pid: (\d+)\)")
JOINED = re.compile(r"(\d+)/(\d+) clients joined")
NOT_JOINED = re.compile(r"DistStoreError|DistNetworkError|RendezvousTimeoutError|RendezvousClosedError")


@dataclass
class Launch:
    """One `train --num-processes N | --launch-config FILE` as the user asked for it."""

    recipe: Path
    args: list[str]  # overrides and flags, passed on to every process
    num_processes: int | None = None
    config: Path | None = None
    max_restarts: int = 0
    join_timeout: int = JOIN_TIMEOUT
    cluster: dict[str, Any] = field(default_factory=dict)  # the launch config as read

    @property
    def machines(self) -> int:
        return int(self.cluster.get("num_machines", 1) or 1)

    @property
    def address(self) -> str:
        return f"{self.cluster.get('main_process_ip', '127.0.0.1')}:{self.cluster.get('main_process_port', 29500)}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_config(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        raise UserError(f"--launch-config: file not found: {path}")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"--launch-config {path}: cannot read it: {exc}") from None


def launch_command(how: Launch) -> list[str]:
    tail = ["-m", "peftcli.cli", "train", str(how.recipe), *how.args]
    if how.config is None and how.max_restarts:
        # Accelerate's one-machine launch rendezvous statically, and torch's static store keeps
        # the failed group's addresses: a restarted group would dial them. torch's standalone
        # (c10d) rendezvous gives every group a fresh store (and finds its own free port).
        run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--monitor_interval", "0.1"]
        return [
            *run,
            "--nproc_per_node",
            str(how.num_processes),
            "--max_restarts",
            str(how.max_restarts),
            *tail,
        ]
    if how.machines < 2 and how.max_restarts:
        raise UserError(
            f"--max-restarts with a one-machine launch config ({how.config}) is not supported",
            "use --num-processes N --max-restarts, or a config with num_machines > 1",
        )
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if how.config is not None:
        cmd += ["--config_file", str(how.config)]
        if how.num_processes:
            cmd += ["--num_processes", str(how.num_processes)]
    else:
        cmd += ["--num_processes", str(how.num_processes), "--num_machines", "1", "--mixed_precision", "no"]
        cmd += ["--dynamo_backend", "no", "--main_process_port", str(free_port())]
        if how.num_processes and how.num_processes > 1:
            cmd.append("--multi_gpu")
    if how.machines > 1 and how.max_restarts:
        # Restarting a group of machines takes an elastic rendezvous the launchers re-enter
        # together; the main machine hosts its store (on one host standing in for several,
        # every launcher would otherwise try to).
        host = int(how.cluster.get("machine_rank", 0) or 0) == 0
        cmd += [
            "--rdzv_backend",
            "c10d",
            "--rdzv_conf",
            f"join_timeout={how.join_timeout},is_host={int(host)}",
        ]
    elif how.machines > 1:
        cmd += ["--rdzv_conf", f"timeout={how.join_timeout}"]
    if how.max_restarts:
        cmd += ["--max_restarts", str(how.max_restarts)]
    return [*cmd, *tail]


class Relay(threading.Thread):
    """Passes the launcher's stderr on; holds back a failing group's tracebacks and elastic
    logs (until a restart shows they are dealt with, or the end shows whether they matter), and
    notes for the restarted group how each local process ended."""

    def __init__(self, stream: Any, faults_dir: Path, debug: bool):
        super().__init__(daemon=True)
        self.stream, self.faults_dir, self.debug = stream, faults_dir, debug
        self.held: list[str] = []
        self.seen: list[str] = []  # every held line, for the diagnosis
        self.exits = 0

    def run(self) -> None:
        for line in self.stream:
            if m := FAILED.search(line):
                self.exits += 1
                exitcode, local_rank, pid = (int(x) for x in m.groups())
                record = {"exitcode": exitcode, "local_rank": local_rank, "pid": pid}
                faults.write(f"exit-{self.exits}.json", record, self.faults_dir)
            if line.startswith("peftcli: restart ") and not self.debug:
                self.held = []  # the failure it restarted after is told in this line
            ours = line.startswith(("peftcli:", "step ", "error:"))
            if not self.debug and not ours and (self.held or NOISE.match(line)):
                self.held.append(line)
                self.seen.append(line)
                continue
            sys.stderr.write(line)
            sys.stderr.flush()

    def release(self) -> None:
        sys.stderr.writelines(self.held)
        sys.stderr.flush()
        self.held = []


def launch(how: Launch) -> int:
    if how.num_processes is not None and how.num_processes < 1:
        raise UserError(f"--num-processes must be at least 1, not {how.num_processes}")
    cmd = launch_command(how)
    debug = os.environ.get("PEFTCLI_DEBUG", "") not in ("", "0")
    with tempfile.TemporaryDirectory(prefix="peftcli-faults-") as faults_dir:
        env = {**os.environ, "PEFTCLI_LAUNCHED": "1", faults.FAULTS: faults_dir}
        env[faults.RESTARTS] = str(how.max_restarts)
        # torch's elastic rendezvous lends the workers its own store, shared by every round, so a
        # restarted group would read the failed one's addresses: each group gets a fresh store.
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
        print("peftcli: launching " + " ".join(cmd[1:]), file=sys.stderr, flush=True)
        # The launcher runs in a session of its own, so a Ctrl-C reaches this process only: it is
        # passed to the training processes themselves, which finish their step, checkpoint and end;
        # the launcher sees them end normally (a signal to it would abort them with a traceback).
        process = subprocess.Popen(cmd, env=env, start_new_session=True, stderr=subprocess.PIPE, text=True)
        relay = Relay(process.stderr, Path(faults_dir), debug)
        relay.start()
        code, asked = wait(process)
        relay.join(timeout=30)
        if asked:
            relay.release()
            return 128 + asked[0]
        if code != 0 and (failure := diagnose(how, relay, Path(faults_dir))) is not None:
            raise failure
        relay.release()
        return code


def wait(process: subprocess.Popen) -> tuple[int, list[int]]:
    asked: list[int] = []

    def stop(signum: int, frame: object) -> None:
        if asked and signum == signal.SIGINT:  # a second Ctrl-C: stop at once
            os.killpg(process.pid, signal.SIGKILL)
        asked.append(signum)
        for pid in training_processes(process.pid):
            os.kill(pid, signum)

    handlers = {sig: signal.signal(sig, stop) for sig in FORWARDED}
    try:
        return process.wait(), asked
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


LAUNCHERS = (b"accelerate.commands.launch", b"torch.distributed.run")


def training_processes(launcher: int) -> list[int]:
    """The launcher's descendants that run peftcli, not the launchers that start them (Linux
    /proc; elsewhere the launcher itself)."""
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
            line = (proc / str(pid) / "cmdline").read_bytes()
            if b"peftcli.cli" in line and not any(x in line for x in LAUNCHERS):
                found.append(pid)
        except OSError:
            continue
    return found


# --------------------------------------------------------------------------- what went wrong


def diagnose(how: Launch, relay: Relay, where: Path) -> UserError | None:
    """The one line for a group that failed as groups do (a machine that never joined, a process
    or machine lost); None for anything else (a real error), whose tracebacks are then shown."""
    if not faults.read(where, faults.ROSTER):  # no process of this machine ever started
        said = "".join(relay.seen)
        if how.machines > 1 and NOT_JOINED.search(said):
            return not_joined(how, JOINED.search(said))
        return None
    ended = faults.what_ended(where)
    if ended is None or ended[0] == 1:  # an error in the program: its traceback says more
        return None
    return GroupFailed(f"{ended[2]}, and the group stopped; {continue_with(how)}")


def not_joined(how: Launch, joined: re.Match | None) -> UserError:
    count = f"{joined[1]} of {joined[2]} machines" if joined else f"not all {how.machines} machines"
    return UserError(
        f"{count} joined within --join-timeout {how.join_timeout} s at {how.address} "
        f"(num_machines: {how.machines} in {how.config})",
        f"start `peftcli train ... --launch-config` on every machine, machine_rank 0 to {how.machines - 1}, "
        f"each able to reach {how.address}",
    )


def continue_with(how: Launch) -> str:
    from peftcli.run_folder.layout import Layout, is_run, is_unfinished, latest

    command = f"peftcli train {how.recipe} {' '.join(how.args)}".strip()
    flags = [f"--launch-config {how.config}"] if how.config else [f"--num-processes {how.num_processes}"]
    if how.max_restarts:
        flags.append(f"--max-restarts {how.max_restarts}")
    for folder in folders(how):
        if is_run(folder) and is_unfinished(folder):
            checkpoint = latest(Layout(folder).checkpoints)
            newest = (
                f"the newest complete checkpoint is {checkpoint}" if checkpoint else "no checkpoint was saved"
            )
            again = re.sub(r" --overwrite\b| --resume\b", "", command)
            machines = " on every machine" if how.machines > 1 else ""
            return f"{newest}; continue with `{again} {' '.join(flags)} --resume`{machines}"
    return f"nothing was trained; start it again with `{command} {' '.join(flags)}`"


def folders(how: Launch) -> list[Path]:
    from peftcli.recipe_file import load_recipe
    from peftcli.run_folder.layout import Layout

    overrides = [a for a in how.args if not a.startswith("--")]
    run_dir = load_recipe(how.recipe, overrides).output_dir
    return [Layout(run_dir).partial, run_dir]
