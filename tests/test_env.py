"""`peftcli env`: run as a user runs it (the console script in a fresh process), in text and
JSON, with every package's version checked against the installed metadata; a bitsandbytes
whose import fails is reported, not fatal, and what it prints never reaches stdout."""

from __future__ import annotations

import importlib.metadata
import json
import os

import pytest

from peftcli.commands.env import NOT_INSTALLED, OPTIONAL, PACKAGES, lock_drift

from .conftest import run_cli

KEYS = {
    "peftcli",
    "python",
    "platform",
    "packages",
    "torch",
    "bitsandbytes",
    "cuda_devices",
    "cpu",
    "caches",
    "environment",
    "lock",
}


def installed(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return NOT_INSTALLED


def env_json(**kwargs) -> dict:
    proc = run_cli("env", "--json", **kwargs)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)  # the whole of stdout is one JSON document


def test_text_lists_every_section_and_the_installed_versions():
    proc = run_cli("env")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for key in ("peftcli", "python", "platform", "packages", "devices", "cpu features", "caches"):
        assert key in out, key
    for label in ("torch threads", "peftcli home", "builtin models", "hub cache", "hub offline"):
        assert label in out, label
    packages = out.split("\npackages\n")[1].split("\ndevices\n")[0]
    rows = dict(line.split(maxsplit=1) for line in packages.splitlines())
    for name in ("transformers", "peft", "accelerate", "datasets", "torch", "bitsandbytes"):
        assert (rows[name] + " ").startswith(installed(name) + " "), (name, rows[name])
    assert "error:" not in out
    # bitsandbytes logs about optional kernels on import; none of it may leak out
    assert "kernels" not in proc.stderr and "Traceback" not in proc.stderr


def test_json_has_the_keys_and_matches_the_environment(peftcli_home):
    import torch

    info = env_json()
    assert set(info) == KEYS
    assert set(info["packages"]) == set(PACKAGES + OPTIONAL)
    for name, version in info["packages"].items():
        assert version == installed(name), name
    assert info["peftcli"]["version"] == importlib.metadata.version("peftcli")
    assert info["torch"]["version"] == torch.__version__
    assert info["torch"]["cuda_available"] is torch.cuda.is_available()
    assert len(info["cuda_devices"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert info["cpu"]["cores"] == os.cpu_count() and info["cpu"]["ram_bytes"] > 0
    if installed("bitsandbytes") != NOT_INSTALLED:
        assert {"backend", "library"} <= set(info["bitsandbytes"])
        assert not str(info["bitsandbytes"]["library"]).startswith("error:")
    # conftest gives the session a private PEFTCLI_HOME and sets HF_HUB_OFFLINE=1
    caches = info["caches"]
    assert caches["peftcli_home"] == str(peftcli_home)
    assert caches["builtin_models"].startswith(str(peftcli_home))
    assert caches["hf_hub_offline"] is True
    assert info["environment"]["HF_HUB_OFFLINE"] == "1"


def test_broken_bitsandbytes_is_reported_not_fatal(tmp_path):
    """A bitsandbytes whose import fails (as a CUDA binary without its runtime does), shadowing
    the installed one: the command still answers, with the error as the backend's value, and
    what the import printed or warned stays out of stdout and stderr."""
    fake = tmp_path / "bitsandbytes"
    fake.mkdir()
    (fake / "__init__.py").write_text(
        "import sys, warnings\n"
        "print('noise on stdout from a broken bitsandbytes')\n"
        "print('noise on stderr from a broken bitsandbytes', file=sys.stderr)\n"
        "warnings.warn('a warning from a broken bitsandbytes')\n"
        "raise RuntimeError('CUDA Setup failed despite GPU being available.\\nsecond line')\n"
    )
    path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)
    info = env_json(env={"PYTHONPATH": path})
    assert info["bitsandbytes"] == "error: RuntimeError: CUDA Setup failed despite GPU being available."
    assert info["packages"]["bitsandbytes"] == installed("bitsandbytes")  # the metadata is still there
    assert isinstance(info["torch"], dict) and isinstance(info["caches"], dict)

    proc = run_cli("env", env={"PYTHONPATH": path})
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.split()[:1] == ["bitsandbytes"])
    assert "error: RuntimeError: CUDA Setup failed despite GPU being available." in line
    assert "noise" not in proc.stdout + proc.stderr and "warning from" not in proc.stderr


def test_lock_drift_names_what_differs(tmp_path):
    """Against a lock that pins one package wrongly and one that is absent, with the rest of the
    environment unlisted: those two and the unlisted packages differ, but not torch or what torch
    alone needs (installed apart from the lock)."""
    lock = tmp_path / "lock.txt"
    lock.write_text(
        "# a lock\n"
        f"transformers==0.0.1 \\\n    --hash=sha256:{'0' * 64}\n"
        f"peft=={importlib.metadata.version('peft')}\n"
        "no-such-package-here==1.0\n"
    )
    drift = lock_drift(lock)
    assert drift["packages"] == 3
    differs = drift["differs"]
    assert differs["transformers"] == f"{importlib.metadata.version('transformers')} (lock 0.0.1)"
    assert differs["no-such-package-here"] == "not installed (lock 1.0)"
    assert "peft" not in differs
    assert differs["pytest"] == f"{importlib.metadata.version('pytest')} (not in the lock)"
    for apart in ("torch", "sympy", "filelock", "pip", "peftcli"):
        assert apart not in differs


@pytest.mark.gpu
def test_cuda_devices_are_listed():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    devices = env_json()["cuda_devices"]
    assert [d["index"] for d in devices] == list(range(torch.cuda.device_count()))
    for d in devices:
        props = torch.cuda.get_device_properties(d["index"])
        assert d["name"] == props.name and d["memory_bytes"] == props.total_memory
        assert d["capability"] == f"{props.major}.{props.minor}"
        assert d["bf16"] is (props.major >= 8 or torch.version.hip is not None)
