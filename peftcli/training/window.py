"""The training loop's bookkeeping between steps: the log window's sums (checkpointed for
resume), the first non-finite gradient norm (kept on the device), the metrics.jsonl row, the
progress display, and the error a diverged run ends with."""

from __future__ import annotations

import math
import sys
import time
from typing import TYPE_CHECKING, Any

import torch

from peftcli.errors import UserError

if TYPE_CHECKING:
    from peftcli.objectives.base import Objective
    from peftcli.training.checkpoint import Checkpointer


class Window:
    """The objective's sums between two log rows, plus run totals; checkpointed for resume."""

    def __init__(
        self, accelerator: Any, names: tuple[str, ...], counted: str, saved: dict[str, Any] | None = None
    ):
        self.accelerator, self.names, self.counted = accelerator, names, counted
        saved = saved or {}
        if "sums" not in saved:  # a checkpoint of peftcli before objectives were one interface
            old = {"loss": saved.get("loss", 0.0), "supervised_tokens": saved.get("supervised", 0)}
            saved = {
                **saved,
                "sums": {**old, **saved.get("extra", {})},
                "total_counted": saved.get("total_supervised", 0),
            }
        # Saved sums are global; only the main process carries them forward.
        kept = saved["sums"] if accelerator.is_main_process else {}
        device = accelerator.device
        self.sums = torch.tensor([kept.get(k, 0.0) for k in names], dtype=torch.float64, device=device)
        self.tokens = torch.tensor(
            saved.get("tokens", 0) if accelerator.is_main_process else 0, device=device
        )
        self.total_tokens = saved.get("total_tokens", 0)
        self.total_counted = saved.get("total_counted", 0)
        self.started = time.perf_counter()

    def add(self, sums: dict[str, torch.Tensor], tokens: int) -> None:
        self.sums += torch.stack([sums[k] for k in self.names]).to(self.sums)
        self.tokens += tokens

    def reduced(self) -> tuple[dict[str, float], int]:
        r = self.accelerator.reduce
        return dict(zip(self.names, r(self.sums, "sum").tolist(), strict=True)), int(r(self.tokens, "sum"))

    def close(self) -> tuple[dict[str, float], int, float]:
        """(the window's sums, tokens, seconds); starts a new one."""
        sums, tokens = self.reduced()
        seconds = time.perf_counter() - self.started
        self.total_tokens += tokens
        self.total_counted += int(round(sums[self.counted]))
        self.sums.zero_()
        self.tokens.zero_()
        self.started = time.perf_counter()
        return sums, tokens, seconds

    def state(self) -> dict[str, Any]:
        sums, tokens = self.reduced()
        return {
            "sums": sums,
            "tokens": tokens,
            "total_tokens": self.total_tokens,
            "total_counted": self.total_counted,
        }


def log_row(
    step: int,
    epoch: float,
    window: Window,
    objective: Objective,
    scheduler: Any,
    grad_norm: torch.Tensor | None,
    checkpoints: Checkpointer | None,
) -> dict[str, Any]:
    """The metrics.jsonl row of the window that ends at `step` (a diverged loss stops the run)."""
    sums, tokens, seconds = window.close()
    measured = objective.metrics(sums)
    if not math.isfinite(measured["loss"]):
        diverged(step, f"the loss is {measured['loss']}", checkpoints)
    row = {"step": step, "epoch": epoch, **measured, "lr": scheduler.get_last_lr()[0]}
    row.update(tokens=window.total_tokens, tokens_per_s=round(tokens / max(seconds, 1e-9), 1))
    if grad_norm is not None:
        row["grad_norm"] = float(grad_norm)
    return row


class Progress:
    """A live bar on a terminal; in logs (CI, SLURM, pipes) one line per logged step instead.
    Only the main process shows anything."""

    def __init__(self, total: int, done: int, main: bool):
        from tqdm.auto import tqdm

        self.total, self.main = total, main
        self.interactive = sys.stderr.isatty()
        self.bar = tqdm(
            total=total,
            initial=done,
            desc="train",
            unit="step",
            file=sys.stderr,
            dynamic_ncols=True,
            disable=not (main and self.interactive),
        )

    def update(self) -> None:
        self.bar.update(1)

    def show(self, row: dict[str, Any]) -> None:
        loss, lr, speed = row["loss"], row["lr"], row["tokens_per_s"]
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{speed:.0f}")
        if self.main and not self.interactive:
            line = f"step {row['step']}/{self.total}  loss {loss:.4f}  lr {lr:.2e}  {speed:.0f} tok/s"
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        self.bar.close()


class Finite:
    """The first step whose gradient norm was not finite, kept on the device: a check every step
    would make the host wait for the GPU each step. `fit` reads it before anything is logged,
    evaluated or checkpointed, so no checkpoint holds the weights such a step wrote."""

    def __init__(self, device: Any):
        self.first = torch.zeros((), dtype=torch.long, device=device)
        self.norm = torch.zeros((), dtype=torch.float32, device=device)

    def note(self, step: int, grad_norm: torch.Tensor | None) -> None:
        if grad_norm is not None:
            new = (self.first == 0) & ~torch.isfinite(grad_norm)
            self.first = torch.where(new, step, self.first)
            self.norm = torch.where(new, grad_norm.float(), self.norm)

    def check(self, checkpoints: Checkpointer | None) -> None:
        if step := int(self.first):
            diverged(step, f"the gradient norm is {float(self.norm)}", checkpoints)


def diverged(step: int, what: str, checkpoints: Checkpointer | None) -> None:
    good = checkpoints.last_good() if checkpoints else None
    raise UserError(
        f"training diverged at step {step}: {what}; the adapter was not saved"
        + (f"; the last good checkpoint is {good}" if good else ""),
        "lower training.lr or set training.max_grad_norm" + (", then --resume" if good else ""),
    )
