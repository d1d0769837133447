"""The Accelerator a command runs under, and what it reports about a wrapped model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peftcli.errors import UserError
from peftcli.recipe import TrainingSection


def make_accelerator(section: TrainingSection, project_dir: Path) -> Any:
    import torch
    from accelerate import Accelerator, DataLoaderConfiguration

    precision = section.mixed_precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    if precision == "fp16" and not torch.cuda.is_available():
        raise UserError("training.mixed_precision: fp16 needs a CUDA GPU", "use bf16 or no on CPU")
    trackers = [t for t in section.report_to if t != "jsonl"]
    return Accelerator(
        # Without a GPU, processes started by a launcher talk over gloo.
        cpu=not torch.cuda.is_available(),
        mixed_precision=precision,
        log_with=trackers or None,
        project_dir=str(project_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )


def trainable_summary(model: Any) -> dict[str, int]:
    trainable, total = model.get_nb_trainable_parameters()
    return {"trainable_params": int(trainable), "total_params": int(total)}
