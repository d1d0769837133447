"""Many machines that fail like one (issue #31): one host stands in for two machines on loopback
(gloo, free ports). A lost machine ends its peer's launcher in one line naming `--resume`; a
machine that never joins ends in one line after --join-timeout; --max-restarts continues a
failed group from its newest checkpoint by itself, ending with the uninterrupted adapter."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from .conftest import PEFTCLI_SCRIPT, ROOT, cli, run_cli, write_recipe

STEPS = 30  # long enough that a kill right after the first checkpoint comes well before the end
COMMON = [f"training.max_steps={STEPS}", "training.save_every=2", "training.log_every=1"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine_configs(folder: Path, **extra) -> list[Path]:
    import yaml

    port, paths = free_port(), []
    for rank in (0, 1):
        config = {
            "compute_environment": "LOCAL_MACHINE",
            "distributed_type": "MULTI_GPU",
            "num_machines": 2,
            "num_processes": 2,
            "machine_rank": rank,
            "main_process_ip": "127.0.0.1",
            "main_process_port": port,
            "mixed_precision": "no",
            "use_cpu": True,
            "rdzv_backend": "static",
            "same_network": True,
            **extra,
        }
        paths.append(folder / f"machine{rank}.yaml")
        paths[-1].write_text("# peftcli train\n" + yaml.safe_dump(config))
    return paths


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The recipe (float64, so 2 machines × 1 process equal 1 machine × 2 processes) and the
    uninterrupted 2-process run every faulted run must end equal to."""
    folder = tmp_path_factory.mktemp("faults")
    lines = (ROOT / "data" / "quickstart" / "train.jsonl").read_text().splitlines()[:64]
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    recipe = write_recipe(
        folder / "r.yaml",
        model={"dtype": "float64"},
        data={"train": str(folder / "train.jsonl"), "eval": 0.0},
        training={"batch_size": 4, "mixed_precision": "no", "collective_timeout": 30},
    )
    done = run_cli(
        "train", str(recipe), *COMMON, "--num-processes", "2", f"training.output_dir={folder / 'ref'}"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return recipe, adapter(folder / "ref")


def adapter(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run / "adapter" / "adapter_model.safetensors")


def assert_equal(run: Path, reference: dict[str, torch.Tensor]) -> None:
    mine = adapter(run)
    assert mine.keys() == reference.keys()
    assert all(torch.equal(mine[k], reference[k]) for k in reference), "bit for bit"


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [str(PEFTCLI_SCRIPT), "train", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )


def family(pid: int) -> list[int]:
    """The process and all its descendants (the launcher's are in a session of their own)."""
    from peftcli.home import proc_stat

    parents = {int(p.name): int(f[1]) for p in Path("/proc").glob("[0-9]*") if (f := proc_stat(p.name))}
    found, grew = {pid}, True
    while grew:
        more = {c for c, parent in parents.items() if parent in found} - found
        found |= more
        grew = bool(more)
    return sorted(found)


def workers(pid: int) -> list[int]:
    from peftcli.training.launch import training_processes

    return sorted(training_processes(pid))


def kill(pids: list[int]) -> None:
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_for(condition, procs: list[subprocess.Popen], seconds: float = 240) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        for p in procs:
            assert p.poll() is None, p.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def checkpointed(run: Path):
    return lambda: any((run / "checkpoints").glob("step-*/state.json")) and not (run / "adapter").exists()


def finish(procs: list[subprocess.Popen], seconds: float = 150) -> list[str]:
    """Wait for every process (bounded); kill whatever is left; their stderr."""
    said = []
    try:
        for p in procs:
            said.append(p.communicate(timeout=seconds)[1])
    finally:
        for p in procs:
            if p.poll() is None:
                kill(family(p.pid))
                p.wait(timeout=30)
    return said


def one_error(text: str) -> str:
    assert "Traceback" not in text, text[-3000:]
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and text.strip().splitlines()[-1] == errors[0], text[-3000:]
    return errors[0]


def test_a_lost_machine_ends_its_peer_in_one_line_and_resume_ends_equal(setup, tmp_path):
    recipe, reference = setup
    run = tmp_path / "run"
    m0, m1 = machine_configs(tmp_path)
    out = [*COMMON, f"training.output_dir={run}"]
    procs = [start(str(recipe), *out, "--launch-config", str(m)) for m in (m0, m1)]
    try:
        wait_for(checkpointed(run), procs)
        kill(family(procs[1].pid))  # machine 1: its launcher and its worker
        lost_at = time.monotonic()
        said = finish(procs[:1], seconds=30 + 30)[0]  # collective_timeout + 30 s
        waited = time.monotonic() - lost_at
    finally:
        finish(procs)
    assert procs[0].returncode == 1, said[-3000:]
    line = one_error(said)
    assert "lost rank 1 on" in line and "checkpoints/step-" in line, line
    assert f"--launch-config {m0} --resume` on every machine" in line, line
    print(f"machine 0 exited {waited:.1f} s after machine 1 was killed")
    again = [start(str(recipe), *out, "--launch-config", str(m), "--resume") for m in (m0, m1)]
    said = finish(again)
    assert [p.returncode for p in again] == [0, 0], said[0][-3000:] + said[1][-3000:]
    assert_equal(run, reference)
    rows = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows == list(range(1, STEPS + 1)), "metrics.jsonl: each step once"


def test_a_machine_that_never_joins_ends_in_one_line(setup, tmp_path):
    recipe, _ = setup
    m0, _ = machine_configs(tmp_path)
    began = time.monotonic()
    done = run_cli(
        "train",
        str(recipe),
        f"training.output_dir={tmp_path / 'run'}",
        "--launch-config",
        str(m0),
        "--join-timeout",
        "20",
        timeout=60,
    )
    assert time.monotonic() - began < 60
    assert done.returncode == 2, done.stderr[-3000:]
    line = one_error(done.stderr)
    assert "1 of 2 machines joined within --join-timeout 20 s at 127.0.0.1:" in line, line


def test_max_restarts_continues_a_killed_worker_by_itself(setup, tmp_path):
    """A worker SIGKILLed after a checkpoint: the group restarts from it; one killed before the
    first checkpoint: from step 0. Both end with the uninterrupted adapter."""
    recipe, reference = setup
    for name, cadence, ready in (
        ("after", "training.save_every=2", lambda run: checkpointed(run)),
        ("before", "training.save_every=25", lambda run: lambda: (run / "metrics.jsonl").is_file()),
    ):
        run = tmp_path / name
        proc = start(
            str(recipe),
            *COMMON,
            cadence,
            f"training.output_dir={run}",
            "--num-processes",
            "2",
            "--max-restarts",
            "2",
        )
        try:
            wait_for(ready(run), [proc])
            had_checkpoint = any((run / "checkpoints").glob("step-*/state.json"))
            kill(workers(proc.pid)[-1:])
            said = finish([proc])[0]
        finally:
            finish([proc])
        assert proc.returncode == 0, said[-3000:]
        assert "Traceback" not in said, said[-3000:]
        assert had_checkpoint == (name == "after")
        restart = [
            line for line in said.splitlines() if line.startswith("peftcli: restart 1 of 2 after rank")
        ]
        assert restart, said[-3000:]
        assert ("continuing from checkpoints/step-" if name == "after" else "from step 0") in restart[0]
        assert json.loads((run / "eval.json").read_text())["train"]["restarts"] == 1
        assert_equal(run, reference)


def test_two_machines_restart_together_after_a_worker_dies(setup, tmp_path):
    recipe, reference = setup
    run = tmp_path / "run"
    out = [*COMMON, f"training.output_dir={run}", "--max-restarts", "1"]
    procs = [start(str(recipe), *out, "--launch-config", str(m)) for m in machine_configs(tmp_path)]
    try:
        wait_for(checkpointed(run), procs)
        kill(workers(procs[1].pid))  # machine 1's worker, not its launcher
        said = finish(procs)
    finally:
        finish(procs)
    assert [p.returncode for p in procs] == [0, 0], said[0][-3000:] + said[1][-3000:]
    assert "peftcli: restart 1 of 1 after" in "".join(said)
    assert json.loads((run / "eval.json").read_text())["train"]["restarts"] == 1
    assert_equal(run, reference)


def test_multi_cpu_on_two_machines_is_refused_before_anything_starts(tmp_path, completion_data, capsys):
    recipe = write_recipe(tmp_path / "r.yaml")
    m0, _ = machine_configs(tmp_path, distributed_type="MULTI_CPU")
    code, _, err = cli("train", str(recipe), "--launch-config", str(m0), capsys=capsys)
    assert code == 2 and "launching" not in err and "Traceback" not in err
    assert "MULTI_CPU" in err and "configs/multi-node-cpu.yaml" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "args, named",
    [
        (["--num-processes", "2", "--max-restarts", "-1"], "--max-restarts"),
        (["--num-processes", "2", "--join-timeout", "soon"], "--join-timeout"),
        (["--num-processes", "2", "training.collective_timeout=soon"], "training.collective_timeout"),
        (["training.collective_timeout=0"], "training.collective_timeout"),
        (["--max-restarts", "1"], "--max-restarts"),
    ],
)
def test_wrong_fault_settings_end_in_one_line(tmp_path, completion_data, capsys, args, named):
    recipe = write_recipe(tmp_path / "r.yaml")
    code, _, err = cli("train", str(recipe), *args, capsys=capsys)
    assert code == 2 and named in err and "launching" not in err, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error:"), err


def test_the_slurm_script_parses():
    assert subprocess.run(["bash", "-n", str(ROOT / "configs" / "slurm.sh")], timeout=30).returncode == 0
