"""Rewards for online RL (GRPO): the `grpo.rewards` list of a recipe, scored on completions.

Built in: `exact_match` (the completion, stripped, equals the row's `column`, stripped), `regex`
(re.search of `pattern`: a format), `contains` (`text` occurs), `length` (min_chars ≤ characters
≤ max_chars); each scores 1.0 or 0.0. `function` names user code, `module:function` or
`path/to/file.py:function`, called as TRL calls a reward function:
`f(prompts=[...], completions=[...], **columns)` — one list per other column of the rows —
returning one number per completion. Importing user code is an explicit act of the recipe; a
reward that is not finite, or a list of the wrong length, stops the run naming the row.

A completion's reward is the weighted sum of its rewards (TRL's `reward_weights`).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from peftcli.errors import UserError

RewardFn = Callable[..., Sequence[float]]


def _exact(column: str) -> RewardFn:
    def score(prompts: list, completions: list[str], **columns: list) -> list[float]:
        if column not in columns:
            raise UserError(
                f"grpo.rewards: exact_match compares with the column `{column}`, which the data lacks "
                f"(it has {sorted(columns) or 'no other column'})",
                "add the column, or set the reward's `column`",
            )
        return [float(c.strip() == str(a).strip()) for c, a in zip(completions, columns[column], strict=True)]

    return score


def _regex(pattern: str) -> RewardFn:
    compiled = re.compile(pattern)
    return lambda prompts, completions, **_: [float(bool(compiled.search(c))) for c in completions]


def _contains(text: str) -> RewardFn:
    return lambda prompts, completions, **_: [float(text in c) for c in completions]


def _length(low: int, high: int | None) -> RewardFn:
    return lambda prompts, completions, **_: [
        float(len(c) >= low and (high is None or len(c) <= high)) for c in completions
    ]


def load_function(spec: str, key: str) -> RewardFn:
    """User code named as `module:function` or `path/to/file.py:function` (the file imported
    under its own name, its folder not put on sys.path)."""
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise UserError(f"{key}: `{spec}` is not module:function or path/to/file.py:function")
    try:
        if where.endswith(".py"):
            path = Path(where).expanduser()
            if not path.is_file():
                raise UserError(f"{key}: the file {where} does not exist")
            module_name = f"peftcli_reward_{path.stem}"
            loaded = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(loaded)  # type: ignore[arg-type]
            sys.modules[module_name] = module
            loaded.loader.exec_module(module)  # type: ignore[union-attr]
        else:
            module = importlib.import_module(where)
    except UserError:
        raise
    except Exception as exc:  # the user's code: any error is theirs to fix
        raise UserError(f"{key}: importing {where} failed: {type(exc).__name__}: {exc}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UserError(f"{key}: {where} has no function `{name}`")
    return fn


def build(spec: Any, key: str) -> RewardFn:
    """One reward of the recipe (a `RewardSpec`) as a function of prompts, completions, columns."""
    if spec.kind == "exact_match":
        return _exact(spec.column)
    if spec.kind == "regex":
        return _regex(spec.pattern)
    if spec.kind == "contains":
        return _contains(spec.text)
    if spec.kind == "length":
        return _length(spec.min_chars, spec.max_chars)
    return load_function(spec.function, key)


class Rewards:
    """The recipe's rewards, built once; `score` gives the [completions, rewards] table."""

    def __init__(self, specs: Sequence[Any]):
        self.names = [s.label for s in specs]
        self.weights = [s.weight for s in specs]
        self.fns = [build(s, f"grpo.rewards[{i}]") for i, s in enumerate(specs)]

    def score(
        self, prompts: list[Any], completions: list[str], columns: list[dict[str, Any]], rows: list[int]
    ) -> list[list[float]]:
        """Each completion's rewards, one per reward function (`rows`: the data rows, for errors)."""
        keys = sorted({k for c in columns for k in c})
        by_column = {k: [c.get(k) for c in columns] for k in keys}
        table = []
        for name, fn in zip(self.names, self.fns, strict=True):
            try:
                values = fn(prompts=prompts, completions=completions, **by_column)
            except UserError:
                raise
            except Exception as exc:  # the user's code
                raise UserError(
                    f"grpo.rewards: {name} failed on data row {rows[0]}: {type(exc).__name__}: {exc}"
                ) from None
            values = list(values) if values is not None else []
            if len(values) != len(completions):
                raise UserError(
                    f"grpo.rewards: {name} returned {len(values)} rewards for {len(completions)} "
                    f"completions (data rows {rows[0]}..{rows[-1]}); return one number per completion"
                )
            table.append([_finite(v, name, row) for v, row in zip(values, rows, strict=True)])
        return [list(r) for r in zip(*table, strict=True)]

    def total(self, scores: list[float]) -> float:
        return sum(w * s for w, s in zip(self.weights, scores, strict=True))


def _finite(value: Any, name: str, row: int) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise UserError(
            f"grpo.rewards: {name} gave {value!r} for a completion of data row {row}; "
            "a reward is a finite number"
        )
    return number


def try_rewards(specs: Sequence[Any], row: dict[str, Any]) -> str:
    """`validate`: build the rewards (importing user code) and score one completion of `row` — the
    row's `answer` where it has one, else an empty one; a line saying what they gave."""
    rewards = Rewards(specs)
    columns = {k: v for k, v in row.items() if k != "prompt"}
    completion = str(row.get("answer", ""))
    scores = rewards.score([row.get("prompt")], [completion], [columns], [1])[0]
    shown = ", ".join(f"{n} {s:g}" for n, s in zip(rewards.names, scores, strict=True))
    return f"rewards: {shown} on the first row with completion {completion!r}"
