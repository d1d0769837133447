"""The one exception type for mistakes a user can fix.

The CLI turns a `UserError` into `error: <message>` on stderr and exit status 2; anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """A mistake in a recipe, a data file, an argument or a path — fixable by the user."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class GroupFailed(UserError):
    """A launched group that lost a process or a machine: reported in one line, exit status 1
    (not a mistake in what was asked, so not 2)."""

    exit_code = 1


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean `x`?)' for the closest choice, or '' when nothing is close."""
    match = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean `{match[0]}`?)" if match else ""


class Interrupted(Exception):
    """Training stopped by Ctrl-C or SIGTERM after finishing a step (checkpointed when it could)."""

    def __init__(self, step: int | None, signal_number: int, checkpoint: object = None):
        super().__init__("interrupted" + (f" at step {step}" if step is not None else ""))
        self.step = step
        self.signal_number = signal_number
        self.checkpoint = checkpoint
        self.command = ""  # the command that continues the run, filled in by the caller

    @property
    def exit_code(self) -> int:
        return 128 + self.signal_number  # 130 for SIGINT, 143 for SIGTERM, as shells report them
