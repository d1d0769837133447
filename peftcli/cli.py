"""The `peftcli` command line. Heavy libraries are imported inside command bodies so that
`--help`, `validate`, `schema` and `methods` answer at once.

The commands are registered in the order `--help` lists them: peftcli.cli_train (train,
validate, schema, methods), peftcli.cli_use (eval, merge, export, generate, push),
peftcli.cli_plan (data, estimate, compare, env). This module turns what they raise into exit
statuses and one-line messages."""

from __future__ import annotations

import os
import sys

import typer

from peftcli.cli_app import _state, app
from peftcli.errors import Interrupted, UserError

# isort: off
# Each registers its commands on the app, in the order `--help` lists them.
import peftcli.cli_train  # noqa: F401
import peftcli.cli_use  # noqa: F401
import peftcli.cli_plan  # noqa: F401

# isort: on

# Typer vendors click; find its exception base without naming a private module.
_ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def main() -> None:
    try:
        code = app(standalone_mode=False)
        if code == 130:  # click turns Ctrl-C outside training into exit status 130, silently
            print("error: interrupted", file=sys.stderr)
        sys.exit(code if isinstance(code, int) else 0)
    except UserError as exc:
        if _state["debug"]:
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(getattr(exc, "exit_code", 2))
    except _ClickException as exc:
        known = {c.name or c.callback.__name__ for c in app.registered_commands}
        command = next((a for a in sys.argv[1:] if a in known), "")
        print(
            f"error: {exc.format_message()} (see `peftcli {command + ' ' if command else ''}--help`)",
            file=sys.stderr,
        )
        sys.exit(2)
    except Interrupted as exc:
        if os.environ.get("PEFTCLI_LAUNCHED"):  # one of `train --num-processes`'s processes:
            sys.exit(0)  # the launching peftcli reports it, once, with the whole command
        how = f"`{exc.command}`" if exc.command else "--resume"
        if exc.checkpoint:
            print(
                f"error: {exc}; the newest checkpoint is {exc.checkpoint}; continue with {how}",
                file=sys.stderr,
            )
        else:  # --resume would start from step 0: say so, and how to keep progress next time
            print(
                f"error: {exc} with no checkpoint saved, so its progress is lost; {how} trains it again "
                "from step 0 (set training.save_every, e.g. training.save_every=50, to keep progress next time)",
                file=sys.stderr,
            )
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
