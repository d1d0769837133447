"""peftcli's cache folder (`$PEFTCLI_HOME`, default `~/.cache/peftcli`): builtin models and
prepared data live under it."""

from __future__ import annotations

import os
from pathlib import Path

from peftcli.errors import UserError


def home() -> Path:
    """peftcli's cache folder (builtin models, prepared data); one that cannot be is refused."""
    if os.environ.get("PEFTCLI_HOME"):
        path, name = Path(os.environ["PEFTCLI_HOME"]).expanduser(), "PEFTCLI_HOME"
    else:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path, name = Path(cache) / "peftcli", "the cache folder"
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"{name} {path}: {existing} is a file, not a folder", HOME_HINT)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{name} {path} is not writable", HOME_HINT)
    return path


HOME_HINT = "set PEFTCLI_HOME to a folder you can write to"


def make_dirs(path: Path) -> None:
    """mkdir -p under peftcli's cache folder, as a one-line error when the system refuses."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {path}: {exc.strerror or exc}", HOME_HINT) from None


def process_alive(pid: int) -> bool:
    """Whether a process of this machine with this pid exists (temporary files and locks left by
    a killed process are recognised by their dead owner, not by age)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by someone else
    except (OSError, ValueError, OverflowError):
        return False
    return True


def proc_stat(pid: int | str) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (so field 4, the parent pid, is [1]);
    None where there is no such process or no /proc."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
