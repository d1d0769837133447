"""Where metrics go: `metrics.jsonl` (always), Accelerate trackers, and `loss.png`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from peftcli.run_folder.layout import read_metrics


class MetricsLog:
    """Appends one JSON object per logged step; the main process owns the file."""

    def __init__(self, path: Path, accelerator: Any, trackers: list[str]):
        self.path = path
        self.accelerator = accelerator
        self.trackers = [t for t in trackers if t != "jsonl"]
        if self.trackers:
            accelerator.init_trackers(path.parent.name)

    def log(self, row: dict[str, Any]) -> None:
        if not self.accelerator.is_main_process:
            return
        row = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self.trackers:
            self.accelerator.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])


def plot_losses(metrics_path: Path, out: Path, title: str = "") -> None:
    """Train and eval loss against the optimizer step; for preference objectives a second panel
    with the reward margin and the reward accuracy (train and eval); for GRPO one with the mean
    reward, each reward's mean, and the held-out reward."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    online = any("reward" in r for r in rows)  # GRPO's sampled rewards
    preference = online or any("reward_margin" in r for r in rows)
    fig, axes = plt.subplots(1, 2 if preference else 1, figsize=(11.0 if preference else 6.4, 4.0), dpi=110)
    ax = axes[0] if preference else axes
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", color="tab:blue")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss", color="tab:orange")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(
        "loss (per step)" if online else "loss (per pair)" if preference else "loss (per supervised token)"
    )
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    if preference:
        (_plot_online_rewards if online else _plot_rewards)(axes[1], rows)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def _plot_rewards(ax: Any, rows: list[dict[str, Any]]) -> None:
    """Reward margin (left axis) and reward accuracy (right axis, 0 to 1), train and eval."""
    for prefix, style in (("", "-"), ("eval_", "o--")):
        margin = [(r["step"], r[f"{prefix}reward_margin"]) for r in rows if f"{prefix}reward_margin" in r]
        if margin:
            ax.plot(
                *zip(*margin, strict=True),
                style,
                color="tab:green",
                label=f"{'eval' if prefix else 'train'} reward margin",
            )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("reward margin (chosen − rejected)")
    ax.grid(alpha=0.3)
    twin = ax.twinx()
    for prefix, style in (("", "-"), ("eval_", "o--")):
        accuracy = [
            (r["step"], r[f"{prefix}reward_accuracy"]) for r in rows if f"{prefix}reward_accuracy" in r
        ]
        if accuracy:
            twin.plot(
                *zip(*accuracy, strict=True),
                style,
                color="tab:purple",
                label=f"{'eval' if prefix else 'train'} reward accuracy",
            )
    twin.set_ylim(-0.02, 1.02)
    twin.set_ylabel("reward accuracy")
    lines = ax.get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="lower right", fontsize="small")


def _plot_online_rewards(ax: Any, rows: list[dict[str, Any]]) -> None:
    """GRPO: the sampled completions' mean reward, each reward's, and the held-out reward."""
    keys = list(dict.fromkeys(k for r in rows for k in r if k == "reward" or k.startswith("reward_")))
    keys = [k for k in keys if k != "reward_std"] + ["eval_reward", "eval_reward_greedy"]
    for key in keys:
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            ax.plot(*zip(*points, strict=True), "o--" if key.startswith("eval_") else "-", label=key)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("mean reward")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
