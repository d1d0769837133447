"""`peftcli env`'s report as text: one aligned row per probe, under its section (the probes are
peftcli.commands.env's; `--json` prints what they found as it is)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from peftcli.commands.env import NOT_INSTALLED, OPTIONAL


def _yes(value: Any) -> str:
    return ("yes" if value else "no") if isinstance(value, bool) else str(value)


def _gib(n: Any) -> str:
    return f"{n / 2**30:.1f} GiB" if isinstance(n, int) else str(n)


def _row(key: str, value: Any, indent: int = 0) -> str:
    return f"{' ' * indent}{key:<{18 - indent}}{value}"


def format_env(info: dict[str, Any]) -> str:
    lines = [*_about(info), "packages", *_packages(info), "devices", *_devices(info)]
    lines += ["caches", *_caches_rows(info["caches"])]
    if info["environment"]:
        lines.append("environment")
        lines.extend(f"  {k}={v}" for k, v in info["environment"].items())
    return "\n".join(lines + _lock_rows(info["lock"]))


def _about(info: dict[str, Any]) -> list[str]:
    me, py = info["peftcli"], info["python"]
    if isinstance(me, dict):
        me = me["version"] + (f" (git {me['git']})" if me.get("git") else "") + f"  {me['location']}"
    if isinstance(py, dict):
        py = f"{py['version']} ({py['implementation']})  {py['executable']}"
    return [_row("peftcli", me), _row("python", py), _row("platform", info["platform"])]


def _packages(info: dict[str, Any]) -> list[str]:
    """Every package with its version; torch with its build, bitsandbytes with its backend."""
    torch_info, bnb = info["torch"], info["bitsandbytes"]
    lines = []
    for name, version in info["packages"].items():
        if name in OPTIONAL and version == NOT_INSTALLED:
            continue
        detail = ""
        if name == "torch" and isinstance(torch_info, dict):
            detail = f"  {torch_info['build']} build"
        elif name == "torch" and torch_info != version:
            detail = f"  {torch_info}"
        elif name == "bitsandbytes" and isinstance(bnb, dict):
            detail = f"  backend {bnb['backend']}, native library {bnb['library']}"
            if "cpu_avx512bf16_kernels" in bnb:
                detail += f", AVX512-BF16 4-bit kernels {_yes(bnb['cpu_avx512bf16_kernels'])}"
        elif name == "bitsandbytes" and bnb != version:
            detail = f"  {bnb}"
        lines.append(_row(name, f"{version}{detail}", 2))
    return lines


def _devices(info: dict[str, Any]) -> list[str]:
    devices, torch_info = info["cuda_devices"], info["torch"]
    lines = []
    if isinstance(devices, list) and devices:
        for d in devices:
            bf16 = {True: "bf16", False: "no bf16"}.get(d["bf16"], d["bf16"])
            gpu = f"{d['name']}, {_gib(d['memory_bytes'])}, compute {d['capability']}, {bf16}"
            lines.append(_row(f"cuda:{d['index']}", gpu, 2))
    elif isinstance(torch_info, dict):
        lines.append(_row("cuda", f"none (torch.cuda.is_available() is {torch_info['cuda_available']})", 2))
    else:
        lines.append(_row("cuda", devices or "none", 2))
    if isinstance(torch_info, dict) and torch_info["mps_available"] is True:
        lines.append(_row("mps", "available", 2))
    lines += _cpu_rows(info["cpu"], torch_info)
    if isinstance(torch_info, dict):
        threads = f"{torch_info['threads']} intra-op, {torch_info['interop_threads']} inter-op"
        lines.append(_row("torch threads", threads, 2))
    return lines


def _cpu_rows(cpu: Any, torch_info: Any) -> list[str]:
    if not isinstance(cpu, dict):
        return [_row("cpu", cpu, 2)]
    cores = f"{cpu['cores']} cores" + (
        f" ({cpu['usable_cores']} usable)" if cpu["usable_cores"] != cpu["cores"] else ""
    )
    available = f" ({_gib(cpu['ram_available_bytes'])} available)" if cpu["ram_available_bytes"] else ""
    features = cpu["features"]
    if isinstance(features, dict):
        features = " ".join(("+" if on else "-") + name for name, on in features.items())
    if isinstance(torch_info, dict):
        features += f"  (torch kernels: {torch_info['cpu_capability']})"
    return [
        _row("cpu", f"{cpu['model']}, {cores}, RAM {_gib(cpu['ram_bytes'])}{available}", 2),
        _row("cpu features", features, 2),
    ]


CACHE_LABELS = {
    "peftcli_home": "peftcli home",
    "builtin_models": "builtin models",
    "data_cache": "data cache",
    "hf_home": "HF home",
    "hf_hub_cache": "hub cache",
    "hf_datasets_cache": "datasets cache",
}


def _caches_rows(caches: Any) -> list[str]:
    if not isinstance(caches, dict):
        return [_row("caches", caches, 2)]
    lines = []
    for key, label in CACHE_LABELS.items():
        path = caches[key]
        missing = "" if path.startswith("error:") or Path(path).exists() else "  (not created yet)"
        lines.append(_row(label, f"{path}{missing}", 2))
    return lines + [_row("hub offline", _yes(caches["hf_hub_offline"]), 2)]


def _lock_rows(lock: Any) -> list[str]:
    if not isinstance(lock, dict):
        return [] if lock is None else [_row("lock", lock)]
    where = os.path.relpath(lock["file"]) if lock["file"].startswith(os.getcwd()) else lock["file"]
    if not lock["differs"]:
        return [_row("lock", f"matches {where} ({lock['packages']} packages)")]
    shown = [f"{name} {what}" for name, what in lock["differs"].items()]
    more = f", and {len(shown) - 8} more (--json lists all)" if len(shown) > 8 else ""
    plural = "s" if len(shown) > 1 else ""
    return [_row("lock", f"{len(shown)} difference{plural} from {where}: " + ", ".join(shown[:8]) + more)]
