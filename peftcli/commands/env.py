"""`peftcli env`: versions, devices, backends and cache folders — what a bug report needs.

Every probe runs under its own guard: a package that is missing shows as `not installed`, one
that fails to import or to answer as `error: <type>: <first line>`. Nothing here may crash (a
broken install is exactly when this command is run), and nothing the probed libraries print
reaches the terminal, so `--json` keeps stdout one JSON document. Versions come from the
installed distributions' metadata; only torch (devices) and bitsandbytes (which native library
it loaded) are imported.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from peftcli.console import silenced

NOT_INSTALLED = "not installed"
# Always listed: what peftcli is built on.
PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "datasets",
    "bitsandbytes",
    "safetensors",
    "tokenizers",
    "huggingface-hub",
    "typer",
    "pydantic",
    "numpy",
)
# Listed when installed: `make bench`, launch configs, attention kernels, trackers.
OPTIONAL = ("trl", "deepspeed", "flash-attn", "kernels", "tensorboard", "wandb", "mlflow")
# CPU flags that choose torch's and bitsandbytes' CPU kernels (bf16 and int8 matmuls above all).
X86_FEATURES = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")
ARM_FEATURES = ("asimd", "sve", "sve2", "bf16", "i8mm")
# Variables that change how a run behaves. Only these are shown: others may hold tokens.
ENV_VARS = (
    "PEFTCLI_HOME",
    "HF_HOME",
    "HF_HUB_CACHE",
    "HF_DATASETS_CACHE",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "CUDA_VISIBLE_DEVICES",
    "OMP_NUM_THREADS",
    "TOKENIZERS_PARALLELISM",
    "PYTORCH_CUDA_ALLOC_CONF",
    "BNB_CUDA_VERSION",
)
# The committed lock of a checkout (`make setup` installs exactly it); absent in a wheel install.
LOCK_FILE = Path(__file__).resolve().parent.parent.parent / "requirements" / "lock.txt"


def collect() -> dict[str, Any]:
    with silenced():
        return {
            "peftcli": _guard(_peftcli),
            "python": _guard(_python),
            "platform": _guard(platform.platform),
            "packages": {name: _guard(lambda n=name: package_version(n)) for name in PACKAGES + OPTIONAL},
            "torch": _guard(_torch),
            "bitsandbytes": _guard(_bitsandbytes),
            "cuda_devices": _guard(_cuda_devices),
            "cpu": _guard(_cpu),
            "caches": _guard(_caches),
            "environment": {k: os.environ[k] for k in ENV_VARS if k in os.environ},
            "lock": _guard(_lock),
        }


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return NOT_INSTALLED


def _error(exc: BaseException) -> str:
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return f"error: {type(exc).__name__}" + (f": {first[:200]}" if first else "")


def _guard(probe: Callable[[], Any]) -> Any:
    try:
        return probe()
    except Exception as exc:  # a broken package is what this command reports, not a reason to stop
        return _error(exc)


def _peftcli() -> dict[str, Any]:
    root = Path(__file__).resolve().parent.parent.parent
    info: dict[str, Any] = {"version": package_version("peftcli"), "location": str(root / "peftcli")}
    if (root / ".git").exists():
        with contextlib.suppress(Exception):
            git = subprocess.run(
                ["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=7"],
                capture_output=True,
                text=True,
                timeout=5,
                stdin=subprocess.DEVNULL,
            )
            if git.returncode == 0:
                info["git"] = git.stdout.strip()
    return info


def _python() -> dict[str, str]:
    return {
        "version": platform.python_version(),
        "implementation": platform.python_implementation(),
        "executable": sys.executable,
    }


def _torch() -> Any:
    if package_version("torch") == NOT_INSTALLED:
        return NOT_INSTALLED
    import torch

    cuda, hip = torch.version.cuda, getattr(torch.version, "hip", None)
    mps = getattr(torch.backends, "mps", None)
    return {
        "version": torch.__version__,
        "build": f"ROCm {hip}" if hip else f"CUDA {cuda}" if cuda else "CPU",
        "cudnn": _guard(lambda: torch.backends.cudnn.version() if cuda else None),
        "cuda_available": _guard(torch.cuda.is_available),
        "mps_available": _guard(lambda: bool(mps and mps.is_available())),
        "cpu_capability": _guard(torch.backends.cpu.get_cpu_capability),
        "threads": _guard(torch.get_num_threads),
        "interop_threads": _guard(torch.get_num_interop_threads),
    }


def _bitsandbytes() -> Any:
    """The backend bitsandbytes chose and the native library it loaded (its own import-time
    probe: CPU, CUDA with the binary matching torch's CUDA, ROCm or XPU)."""
    if package_version("bitsandbytes") == NOT_INSTALLED:
        return NOT_INSTALLED
    from peftcli.console import refuse_hub_kernels

    refuse_hub_kernels()  # its import would fetch a CPU kernel from the Hub (see console)
    import bitsandbytes  # noqa: F401  (runs the probe)
    from bitsandbytes import cextension

    # Read the instance's own attributes: the library object answers any other name with a stub.
    lib = getattr(getattr(cextension, "lib", None), "__dict__", {})
    if "error_msg" in lib:  # the stand-in bitsandbytes uses when no native library loaded
        return {
            "backend": getattr(cextension, "BNB_BACKEND", "?"),
            "library": _error(RuntimeError(lib["error_msg"])),
        }
    handle = lib.get("_lib")
    info = {
        "backend": getattr(cextension, "BNB_BACKEND", "?"),
        "library": Path(handle._name).name if getattr(handle, "_name", None) else None,
    }
    # On CPU, 4-bit layers repack their weights for bitsandbytes' AVX512-BF16 kernels when it says yes.
    probe = getattr(sys.modules.get("bitsandbytes.functional"), "has_avx512bf16", None)
    if info["backend"] == "CPU" and callable(probe):
        info["cpu_avx512bf16_kernels"] = _guard(lambda: bool(probe()))
    return info


def _cuda_devices() -> list[dict[str, Any]]:
    if package_version("torch") == NOT_INSTALLED:
        return []
    import torch

    if not torch.cuda.is_available():
        return []
    devices = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        devices.append(
            {
                "index": i,
                "name": props.name,
                "memory_bytes": props.total_memory,
                "capability": f"{props.major}.{props.minor}",
                "bf16": _guard(lambda i=i: _bf16(torch, i)),
            }
        )
    return devices


def _bf16(torch: Any, index: int) -> bool:
    with torch.cuda.device(index):
        try:
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # torch before 2.4
            return torch.cuda.is_bf16_supported()


def _cpu() -> dict[str, Any]:
    fields: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    model = fields.get("model name") or fields.get("Hardware") or _sysctl("machdep.cpu.brand_string")
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    arm = platform.machine().lower() in ("arm64", "aarch64")
    features: Any = (
        {f: f in flags for f in (ARM_FEATURES if arm else X86_FEATURES)}
        if flags
        else "unknown (no /proc/cpuinfo)"
    )
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "model": model or platform.processor() or platform.machine(),
        "features": features,
        "cores": os.cpu_count(),
        "usable_cores": usable,
        **_memory(),
    }


def _sysctl(name: str) -> str | None:
    if platform.system() != "Darwin":
        return None
    out = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5)
    return out.stdout.strip() or None


def _memory() -> dict[str, int | None]:
    try:
        import psutil

        memory = psutil.virtual_memory()
        return {"ram_bytes": memory.total, "ram_available_bytes": memory.available}
    except Exception:
        pages = os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else None
        return {
            "ram_bytes": pages * os.sysconf("SC_PAGE_SIZE") if pages else None,
            "ram_available_bytes": None,
        }


def _caches() -> dict[str, Any]:
    from huggingface_hub import constants

    from peftcli.data import cache_root
    from peftcli.home import home
    from peftcli.model.builtin import builtin_path

    def datasets_cache() -> str:
        import datasets.config

        return str(datasets.config.HF_DATASETS_CACHE)

    return {
        "peftcli_home": str(home()),
        "builtin_models": str(builtin_path("tiny-llama").parent),
        "data_cache": str(cache_root()),
        "hf_home": str(constants.HF_HOME),
        "hf_hub_cache": str(constants.HF_HUB_CACHE),
        "hf_datasets_cache": _guard(datasets_cache),
        "hf_hub_offline": bool(constants.HF_HUB_OFFLINE),
    }


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _lock() -> Any:
    return lock_drift(LOCK_FILE) if LOCK_FILE.is_file() else None


def lock_drift(path: Path) -> dict[str, Any]:
    """How the installed packages differ from a lock file; torch and what only torch needs (a
    CUDA build's nvidia-* libraries) are installed apart from the lock, per machine."""
    pins = {
        _normalise(name): version
        for name, version in re.findall(r"^([A-Za-z0-9][\w.-]*)==([^\s;\\]+)", path.read_text(), re.M)
    }
    installed: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            installed.setdefault(_normalise(name), dist.version)  # the first on sys.path is the one imported
    apart = {"pip", "peftcli"} | _requirement_closure("torch", installed)
    differs = {
        name: f"{installed.get(name, NOT_INSTALLED)} (lock {want})"
        for name, want in pins.items()
        if installed.get(name) != want
    }
    for name in sorted(installed.keys() - pins.keys() - apart):
        differs[name] = f"{installed[name]} (not in the lock)"
    return {"file": str(path), "packages": len(pins), "differs": differs}


def _requirement_closure(root: str, installed: dict[str, str]) -> set[str]:
    from packaging.requirements import Requirement

    seen: set[str] = set()
    todo = [root]
    while todo:
        name = _normalise(todo.pop())
        if name in seen or name not in installed:
            continue
        seen.add(name)
        for line in importlib.metadata.requires(name) or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen
