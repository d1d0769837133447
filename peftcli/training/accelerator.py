"""The Accelerator a command runs under, what it reports about a wrapped model, and how a run
was distributed (processes, DDP or FSDP and its sharding, precision, devices)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from peftcli.errors import UserError
from peftcli.recipe import TrainingSection


def resolve_precision(section: TrainingSection) -> str:
    """`training.mixed_precision` on this machine (the recipe's, never the launch config's)."""
    import torch

    precision = section.mixed_precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    if precision == "fp16" and not torch.cuda.is_available():
        raise UserError("training.mixed_precision: fp16 needs a CUDA GPU", "use bf16 or no on CPU")
    return precision


def make_accelerator(section: TrainingSection, project_dir: Path) -> Any:
    from datetime import timedelta

    import torch
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import InitProcessGroupKwargs

    precision = resolve_precision(section)
    trackers = [t for t in section.report_to if t != "jsonl"]
    wait = section.collective_timeout
    accelerator = Accelerator(
        # Without a GPU, processes started by a launcher talk over gloo.
        cpu=not torch.cuda.is_available(),
        mixed_precision=precision,
        log_with=trackers or None,
        project_dir=str(project_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=wait))] if wait else None,
    )
    if asked_for() == "FSDP" and accelerator.distributed_type.value == "MULTI_CPU":
        shard_on_cpu(accelerator, precision)
    check_distribution(accelerator)
    return accelerator


def check_launch_config(
    path: Path, section: TrainingSection, method: str, quantization: str, dtype: Any
) -> None:
    """Refuse, before any process starts, a launch config that cannot run as it asks here: DeepSpeed
    without deepspeed or GPUs, FSDP1 without GPUs, under FSDP a method that does not shard, an
    8-bit base, or a 4-bit base whose stored dtype FSDP would cast."""
    import importlib.util

    import torch
    import yaml

    if not path.is_file():
        raise UserError(f"--launch-config: file not found: {path}")
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"--launch-config {path}: cannot read it: {exc}") from None
    kind, gpus = str(config.get("distributed_type", "NO")), torch.cuda.is_available()
    if kind == "MULTI_CPU" and int(config.get("num_machines", 1)) > 1:
        # Accelerate starts MULTI_CPU with its simple launcher: each machine's process alone.
        raise UserError(
            f"--launch-config {path}: distributed_type: MULTI_CPU on several machines starts each "
            "machine's processes alone, never as one group",
            "use distributed_type: MULTI_GPU with use_cpu: true, as configs/multi-node-cpu.yaml does "
            "(without GPUs its processes train on the CPU over gloo)",
        )
    if kind == "DEEPSPEED" and not (gpus and importlib.util.find_spec("deepspeed")):
        raise UserError(
            f"--launch-config {path}: DeepSpeed needs CUDA GPUs and the deepspeed package"
            + ("" if gpus else "; this machine has no GPU"),
            "on CPU, shard with configs/fsdp-cpu.yaml; on GPUs, pip install deepspeed or use configs/fsdp.yaml",
        )
    if kind != "FSDP":
        return
    version = int((config.get("fsdp_config") or {}).get("fsdp_version", 1))
    if version != 2 and not gpus:
        raise UserError(
            f"--launch-config {path}: fsdp_version {version} runs on GPUs only, and this machine has none",
            "set fsdp_config.fsdp_version: 2, as configs/fsdp-cpu.yaml (the CPU twin of configs/fsdp.yaml) does",
        )
    from peftcli.methods.table import METHODS

    if not METHODS[method].shards:
        able = ", ".join(name for name, m in METHODS.items() if m.shards)
        raise UserError(f"peft.method: {method} does not train under FSDP", f"use DDP, or one of {able}")
    if quantization == "8bit":
        # bitsandbytes' Int8Params keeps its scales (SCB) on the parameter object, which FSDP
        # replaces with a DTensor; Accelerate's FSDP2 preparation fails moving them to meta.
        raise UserError(
            "model.quantization: 8bit cannot be sharded by FSDP (bitsandbytes' 8-bit weights are not "
            "plain tensors FSDP can split)",
            "use model.quantization: 4bit (configs/fsdp-qlora.yaml), or DDP",
        )
    precision = resolve_precision(section)
    mixed = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if quantization == "4bit" and mixed is not None and mixed != dtype:
        # FSDP casts every stored tensor to the mixed-precision dtype before computing, the 4-bit
        # weights' storage (bnb_4bit_quant_storage = model.dtype) included: its bytes would be misread.
        raise UserError(
            f"training.mixed_precision: {precision} with a 4-bit base under FSDP needs model.dtype: "
            f"{str(mixed).removeprefix('torch.')} (the 4-bit weights are stored in model.dtype), not "
            f"{str(dtype).removeprefix('torch.')}",
            f"set model.dtype to {str(mixed).removeprefix('torch.')}, or training.mixed_precision: no",
        )


def asked_for() -> str | None:
    """The sharding the launch config asked for (Accelerate's launcher says so in the
    environment): FSDP, DEEPSPEED, or None."""
    for name, kind in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DEEPSPEED")):
        if os.environ.get(name, "false").lower() == "true":
            return kind
    return None


def shard_on_cpu(accelerator: Any, precision: str) -> None:
    """FSDP2 on the CPU over gloo. Accelerate 1.x applies an FSDP config only on accelerators:
    with `cpu=True` it makes the run MULTI_CPU — plain data parallelism, every process holding
    the whole model — and says nothing (state.py: the FSDP branch lists MULTI_GPU, MULTI_XPU,
    ..., never MULTI_CPU). torch's `fully_shard` shards on a CPU mesh as on a GPU one, so the
    state is made FSDP here, with the plugin the launcher's FSDP_* variables describe."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        raise UserError(
            f"fsdp_config.fsdp_version: {plugin.fsdp_version} runs on GPUs only, and this machine has none",
            "use fsdp_version: 2 (configs/fsdp-cpu.yaml), or run on GPUs",
        )
    if precision != "no":
        plugin.set_mixed_precision(precision)
    state = accelerator.state
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def check_distribution(accelerator: Any) -> None:
    """A launch config that asks for sharding and does not get it is refused, not run unsharded."""
    asked, got = asked_for(), accelerator.distributed_type.value
    if asked is not None and got != asked:
        hint = {
            "DEEPSPEED": "DeepSpeed needs CUDA GPUs and `pip install deepspeed`; on CPU use configs/fsdp-cpu.yaml",
            "FSDP": "check the launch config's fsdp_config",
        }[asked]
        raise UserError(f"the launch config asks for {asked}, but Accelerate set up {got}", hint)


def distribution(accelerator: Any) -> dict[str, Any]:
    """How the run is distributed, as recorded in eval.json and printed at start (every process
    calls this: the devices are gathered)."""
    from accelerate.utils import gather_object

    kind = accelerator.distributed_type.value
    how: dict[str, Any] = {"processes": accelerator.num_processes}
    if kind == "FSDP":
        plugin = accelerator.state.fsdp_plugin
        how["type"] = f"FSDP{plugin.fsdp_version}"
        if plugin.fsdp_version == 2:
            how["sharding"] = "FULL_SHARD" if plugin.reshard_after_forward else "SHARD_GRAD_OP"
        else:
            how["sharding"] = str(plugin.sharding_strategy).rsplit(".", 1)[-1]
    elif kind in ("MULTI_GPU", "MULTI_CPU", "MULTI_XPU", "MULTI_NPU", "MULTI_MLU", "MULTI_HPU"):
        how["type"] = "DDP"
    elif kind == "DEEPSPEED":
        how["type"] = f"DeepSpeed ZeRO-{accelerator.state.deepspeed_plugin.zero_stage}"
    else:
        how["type"] = "single process"
    how["mixed_precision"] = accelerator.mixed_precision
    devices = [str(accelerator.device)]
    how["devices"] = gather_object(devices) if accelerator.num_processes > 1 else devices
    return how


def describe(how: dict[str, Any]) -> str:
    sharding = f" {how['sharding']}" if how.get("sharding") else ""
    processes = how["processes"]
    return (
        f"{processes} process{'es' if processes > 1 else ''}, {how['type']}{sharding}, "
        f"mixed precision {how['mixed_precision']}, devices {', '.join(how['devices'])}"
    )


def trainable_summary(model: Any) -> dict[str, int]:
    trainable, total = model.get_nb_trainable_parameters()
    return {"trainable_params": int(trainable), "total_params": int(total)}
