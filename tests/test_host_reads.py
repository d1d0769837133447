"""The training step reads nothing back from the device between logged steps (issue #25).

On a GPU the host queues work ahead of the device; every `.item()`, `int(t)`, `float(t)`,
`bool(t)` or `.tolist()` of a device tensor makes it wait until the device has caught up, and a
step with several such reads leaves the GPU idle between kernels (14 a step were measured on an
H200: ../shared/measurements). On a CPU nothing waits, but the same calls are made, so counting
them here says what a GPU would wait for.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from .conftest import write_recipe

PACKAGE = str(Path(__file__).resolve().parent.parent / "peftcli")
READS = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__")


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_a_training_step_reads_nothing_back_between_logged_steps(
    tmp_path, completion_data, monkeypatch, grad_accum
):
    """Six steps of `train` that log, evaluate and checkpoint only at the end: peftcli's own code
    reads no tensor back from the first forward pass until the final step's reads (its gradient-norm
    check and log row), with max_grad_norm on and with gradient accumulation."""
    import peftcli.training.loop as loop
    from peftcli.recipe_file import load_recipe
    from peftcli.training.run import train

    recipe = write_recipe(
        tmp_path / "r.yaml",
        data={"eval": 0},
        training={
            "max_steps": 6,
            "log_every": 100,
            "save_every": 100,
            "batch_size": 4,
            "grad_accum": grad_accum,
            "max_grad_norm": 1.0,
        },
    )
    phase = {"stepping": False}
    reads: list[str] = []

    def counting(name: str):
        real = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            caller = sys._getframe(1)
            if phase["stepping"] and caller.f_code.co_filename.startswith(PACKAGE):
                reads.append(f"{name} at {Path(caller.f_code.co_filename).name}:{caller.f_lineno}")
            return real(self, *args, **kwargs)

        return read

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    real_backward, real_log_row = loop.backward, loop.log_row

    def backward(*args, **kwargs):
        phase["stepping"] = True
        return real_backward(*args, **kwargs)

    logged = []

    def log_row(*args, **kwargs):
        logged.append(args[0])
        return real_log_row(*args, **kwargs)

    real_check = loop.Finite.check

    def check(self, *args, **kwargs):  # called on steps that log, evaluate or checkpoint only
        phase["stepping"] = False
        return real_check(self, *args, **kwargs)

    monkeypatch.setattr(loop, "backward", backward)
    monkeypatch.setattr(loop, "log_row", log_row)
    monkeypatch.setattr(loop.Finite, "check", check)
    trained = train(load_recipe(recipe))
    assert logged == [6]  # one row: the steps before it logged nothing
    assert trained.metrics is not None
    assert reads == [], reads


def test_a_non_finite_gradient_norm_is_caught_before_anything_is_saved(tmp_path, completion_data, capsys):
    """The gradient-norm check happens where the loop reads anyway; the run still ends with the
    step that went wrong named and no checkpoint written after it."""
    from .conftest import cli

    recipe = write_recipe(
        tmp_path / "r.yaml",
        data={"eval": 0},
        training={"max_steps": 6, "log_every": 3, "save_every": 3, "lr": 1e30, "max_grad_norm": 1.0},
    )
    code, _, err = cli("train", str(recipe), capsys=capsys)
    assert code == 2, err
    line = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(line) == 1 and "training diverged at step" in line[0], err
    checkpoints = tmp_path / "run" / "checkpoints"
    assert not checkpoints.exists() or not any(checkpoints.glob("step-*")), list(checkpoints.iterdir())
