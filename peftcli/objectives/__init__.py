"""What peftcli knows about each `training.objective`, in one table: the data formats it trains
on, whether it compares the policy with a reference model, what evaluation computes for it.

`sft` is supervised fine-tuning (the task's own loss). The others tune on preferences:
- dpo: Direct Preference Optimization (Rafailov et al., 2023), with the loss variants of
  `preference.loss_type` — sigmoid (DPO; with label_smoothing, conservative DPO), ipo (Azar et
  al., 2023, length-normalised as TRL does), hinge (SLiC), robust (Chowdhury et al., 2024);
- orpo: odds-ratio preference optimization (Hong et al., 2024), an SFT loss on the chosen
  answer plus λ times the log-sigmoid of the log odds ratio; no reference;
- simpo: SimPO (Meng et al., 2024), length-normalised log-likelihood margin minus γ; no reference;
- kto: Kahneman-Tversky Optimization (Ethayarajh et al., 2024) on unpaired answers labelled
  desirable or not, against a reference and a batch estimate of the KL term;
- grpo: online RL with rewards (GRPO, Shao et al., 2024): the model samples a group of answers
  per prompt, the `grpo.rewards` score them, each moves by its advantage within its group.

This module imports nothing heavy: the recipe schema, `validate` and the data checks read it.
How each objective trains and evaluates is a class of its own (base.py: the interface; sft.py,
pairs.py, kto.py), which only training and the commands import (build.py makes one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

Objective = Literal["sft", "dpo", "orpo", "simpo", "kto", "grpo"]
DpoLoss = Literal["sigmoid", "ipo", "hinge", "robust"]

# What evaluation computes on preference data. `preference_accuracy`: share of pairs whose chosen
# answer the model finds likelier than the rejected one (summed log-probabilities: the answer it
# would rather produce), with or without a reference, so a base, an SFT and a DPO model compare.
# `reward_*`: the objective's implicit reward β·(log π − log π_ref) (DPO, KTO) or β·mean log π
# (ORPO, SimPO), as TRL reports it.
PREFERENCE_METRICS = (
    "loss",
    "preference_accuracy",
    "reward_accuracy",
    "reward_margin",
)


@dataclass(frozen=True)
class ObjectiveSpec:
    name: str
    formats: tuple[str, ...]  # data formats, in the order `data.format: auto` tries them; () = the task's
    reference: bool  # compares the policy with a frozen reference
    metrics: tuple[str, ...]  # () = the task's (tasks.TASKS)
    sequences: int = 1  # sequences one example is scored as, in one forward pass
    generates: bool = False  # samples its own answers to prompts in training (online RL)

    @property
    def task_loss(self) -> bool:
        """Trains with the task's own loss, data formats and metrics (SFT)."""
        return not self.formats


OBJECTIVES: dict[str, ObjectiveSpec] = {
    o.name: o
    for o in [
        ObjectiveSpec("sft", (), False, ()),
        # A pair's chosen and rejected answers go through one forward pass: two sequences.
        ObjectiveSpec("dpo", ("preference",), True, PREFERENCE_METRICS, sequences=2),
        ObjectiveSpec("orpo", ("preference",), False, PREFERENCE_METRICS, sequences=2),
        ObjectiveSpec("simpo", ("preference",), False, PREFERENCE_METRICS, sequences=2),
        # KTO's mismatched answer for its KL estimate goes through a separate pass without gradients.
        ObjectiveSpec("kto", ("unpaired",), True, ("loss", "reward_accuracy", "reward_margin")),
        # Online RL: prompts (text or chat messages) and the columns its rewards read; it samples
        # its own answers. The reference is the base with the adapter disabled (beta > 0).
        ObjectiveSpec("grpo", ("prompts",), True, ("reward",), generates=True),
    ]
}
assert tuple(OBJECTIVES) == get_args(Objective)
PREFERENCE_FORMATS = tuple(dict.fromkeys(f for o in OBJECTIVES.values() for f in o.formats))


def reading(fmt: str) -> list[str]:
    """The objectives that train on data format `fmt`, first the one a file of it calls for."""
    return [o for o, spec in OBJECTIVES.items() if fmt in spec.formats]


def objective_problem(objective: str, task: str, packing: bool, train_on: str, fmt: str) -> str | None:
    """What in a recipe's model and data sections does not fit its objective (one line), or None."""
    if OBJECTIVES[objective].task_loss:
        if fmt in PREFERENCE_FORMATS:
            return (
                f"data.format: {fmt} trains with training.objective: {' | '.join(reading(fmt))}, "
                f"not {objective}; set training.objective"
            )
        return None
    if task != "causal_lm":
        return f"training.objective: {objective} tunes causal language models; model.task is {task}"
    if packing:
        return (
            f"data.packing does not apply to training.objective: {objective} (each pair is scored as "
            "whole sequences); remove it"
        )
    if train_on != "completion":
        return (
            f"data.train_on: {train_on} does not apply to training.objective: {objective}; "
            "preferences are scored on the answers"
        )
    wanted = OBJECTIVES[objective].formats
    if fmt != "auto" and fmt not in wanted:
        return f"data.format: {fmt} does not fit training.objective: {objective}; use {' or '.join(wanted)} (or auto)"
    return None


def sequences_per_example(objective: str) -> int:
    """Sequences one training example is scored as in one forward pass."""
    return OBJECTIVES[objective].sequences


def eval_objective(trained: str, file_format: str | None) -> str | None:
    """The objective whose metrics `peftcli eval --data FILE` reports: the run's own where the file
    holds the data it trains on, else the first that reads the file's format (pairs: dpo, labelled
    answers: kto); None where neither the run nor the file is one of preferences (the task's)."""
    if file_format is None:
        return None
    return trained if file_format in OBJECTIVES[trained].formats else reading(file_format)[0]
