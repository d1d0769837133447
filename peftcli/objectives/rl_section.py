"""The recipe's `grpo:` section (training.objective: grpo): sampling, the loss, the rewards.

Schema only (pydantic), so that the recipe, `validate` and `schema` read it without torch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

GrpoLoss = Literal["grpo", "dr_grpo", "dapo"]
RewardKind = Literal["exact_match", "regex", "contains", "length", "function"]
# What each kind of reward needs besides `weight`.
NEEDS: dict[str, tuple[str, ...]] = {
    "exact_match": ("column",),
    "regex": ("pattern",),
    "contains": ("text",),
    "length": (),
    "function": ("function",),
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False, strict=True)


class RewardSpec(_Strict):
    kind: RewardKind = Field(
        description="exact_match (vs the row's `column`), regex (`pattern` found), contains (`text` "
        "occurs), length (min_chars..max_chars), or function (user code, `function`)."
    )
    weight: float = Field(1.0, description="Weight of this reward in the completion's reward (a sum).")
    name: str | None = Field(None, description="Name in metrics.jsonl (reward_<name>); default the kind.")
    column: str = Field("answer", description="exact_match: the data column holding the expected answer.")
    pattern: str | None = Field(None, description="regex: a Python regular expression (re.search).")
    text: str | None = Field(None, description="contains: the text a good completion contains.")
    min_chars: int = Field(0, ge=0, description="length: fewest characters that score 1.")
    max_chars: int | None = Field(None, gt=0, description="length: most characters that score 1.")
    function: str | None = Field(
        None,
        description="function: `module:function` or `path/to/file.py:function`, called with prompts=, "
        "completions= and one list per other data column; returns one number per completion.",
    )

    @model_validator(mode="after")
    def _needs(self) -> RewardSpec:
        missing = [k for k in NEEDS[self.kind] if getattr(self, k) is None]
        if missing:
            raise ValueError(f"a {self.kind} reward needs `{missing[0]}`")
        if self.kind == "regex":
            import re

            try:
                re.compile(self.pattern or "")
            except re.error as exc:
                raise ValueError(f"pattern {self.pattern!r} is not a regular expression: {exc}") from None
        return self

    @property
    def label(self) -> str:
        return self.name or self.kind


class GrpoSection(_Strict):
    num_generations: int = Field(
        4, ge=2, description="Completions sampled per prompt (the group); advantages are relative to it."
    )
    max_new_tokens: int = Field(32, gt=0, description="Longest completion, in tokens.")
    temperature: float = Field(
        1.0, gt=0, description="Sampling temperature (the log-probabilities use it too)."
    )
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: the probability mass sampled from.")
    beta: float = Field(
        0.0,
        ge=0,
        description="Weight of the KL term to the reference: the base (the adapter disabled), or the "
        "starting adapter with peft.init_from; no second copy of the model. 0 (TRL's default) skips the "
        "reference's forward pass.",
    )
    epsilon: float = Field(
        0.2, gt=0, description="Clipping of the policy ratio to [1-ε, 1+ε] (PPO's clip, as TRL's GRPO)."
    )
    loss_type: GrpoLoss = Field(
        "dapo",
        description="How token losses are averaged, as TRL defines them: grpo (each completion's mean, then "
        "the mean over completions: short answers weigh more per token), dr_grpo (the sum over all "
        "tokens / (completions × max_new_tokens): no length bias), dapo (the sum / all completion tokens "
        "of the global batch: every token weighs the same; TRL's default).",
    )
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group",
        description="Divide advantages (reward − group mean) by the group's std (group), the whole "
        "batch's std (batch), or not at all (none, as Dr. GRPO recommends).",
    )
    rewards: list[RewardSpec] = Field(
        default_factory=list, description="The rewards; a completion's reward is their weighted sum."
    )
