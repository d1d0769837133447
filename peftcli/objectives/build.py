"""One objective's implementation, made from its recipe sections: the classes behind the rows of
`peftcli.objectives.OBJECTIVES` (the two tables are checked to name the same objectives)."""

from __future__ import annotations

from typing import Any

from peftcli.objectives import OBJECTIVES
from peftcli.objectives.base import Objective
from peftcli.objectives.grpo import GRPO
from peftcli.objectives.kto import KTO
from peftcli.objectives.pairs import DPO, ORPO, SimPO
from peftcli.objectives.sft import SFT

CLASSES: dict[str, type[Objective]] = {
    "sft": SFT,
    "dpo": DPO,
    "orpo": ORPO,
    "simpo": SimPO,
    "kto": KTO,
    "grpo": GRPO,
}
assert tuple(CLASSES) == tuple(OBJECTIVES)


def build_objective(
    name: str,
    task: str,
    tokenizer: Any,
    eval_section: Any,
    preference: Any,
    start: bool = False,
    grpo: Any = None,
) -> Objective:
    """`name`'s objective, for a model of `task` and its tokenizer; `eval_section`,
    `preference` and `grpo` are the recipe's sections, `start` whether the run starts from an
    adapter (peft.init_from: for DPO, KTO and GRPO, the reference)."""
    return CLASSES[name](name, task, tokenizer, eval_section, preference, start, grpo)
