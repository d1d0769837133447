"""Shared fixtures: offline, one builtin-model cache per test session, small data files."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# Tiny models: one thread per process is faster than fighting over two cores, and subprocess
# tests (fresh-process reloads, 2-process runs) inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def peftcli_home(tmp_path_factory):
    """Builtin models are materialised once per session into a private cache."""
    home = os.environ.get("PEFTCLI_TEST_HOME") or str(tmp_path_factory.mktemp("peftcli-home"))
    os.environ["PEFTCLI_HOME"] = home
    return Path(home)


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module's tests (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    tiny models gain nothing from threads, and on a shared CPU the spinning threads of several
    processes slow each other down 10-50x."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def completion_data(tmp_path) -> Path:
    """64 quickstart rows: enough for a few steps with falling loss."""
    lines = (ROOT / "data" / "quickstart" / "train.jsonl").read_text().splitlines()[:64]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def messages_data(tmp_path) -> Path:
    rows = [
        {
            "messages": [
                {"role": "system", "content": "You answer in capitals."},
                {"role": "user", "content": f"say {w}"},
                {"role": "assistant", "content": w.upper()},
                {"role": "user", "content": "again"},
                {"role": "assistant", "content": w.upper() + "!"},
            ]
        }
        for w in ["cat", "dog", "owl", "fox", "emu", "yak", "elk", "ant"] * 4
    ]
    return write_jsonl(tmp_path / "chat.jsonl", rows)


def write_recipe(path: Path, **sections) -> Path:
    import yaml

    recipe = {
        "name": "t",
        "model": {"name_or_path": "builtin:tiny-llama"},
        "peft": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train": "train.jsonl", "eval": 0.25, "max_length": 48},
        "training": {
            "max_steps": 4,
            "batch_size": 8,
            "lr": 3e-3,
            "log_every": 1,
            "output_dir": str(path.parent / "run"),
        },
    }
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value} if isinstance(value, dict) else value
    path.write_text(yaml.safe_dump(recipe))
    return path


def cli(*args: str, capsys=None) -> tuple[int, str, str]:
    """Run `peftcli ARGS` in this process; returns (exit code, stdout, stderr)."""
    from peftcli.cli import main

    old = sys.argv
    sys.argv = ["peftcli", *args]
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = old
    if capsys is None:
        return code, "", ""
    out = capsys.readouterr()
    return code, out.out, out.err


PEFTCLI_SCRIPT = Path(sys.executable).with_name("peftcli")


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600):
    """Run the installed `peftcli` console script in a fresh process, as a user does.

    In-process calls (`cli`) share imports and registrations between tests; this sees exactly
    what a user sees. Returns the CompletedProcess (returncode, stdout, stderr as text)."""
    import subprocess

    command = [str(PEFTCLI_SCRIPT)] if PEFTCLI_SCRIPT.exists() else [sys.executable, "-m", "peftcli.cli"]
    return subprocess.run(
        [*command, *args],
        capture_output=True,
        text=True,
        cwd=cwd or ROOT,
        env={**os.environ, **(env or {})},
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def one_error_line(proc) -> str:
    """The single `error:` line of a refused command (exit 2, no traceback); fails otherwise."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` (`make test-gpu`) skip themselves where no CUDA device is visible."""
    gpu = [item for item in items if "gpu" in item.keywords]
    if not gpu:
        return
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in gpu:
            item.add_marker(skip)
