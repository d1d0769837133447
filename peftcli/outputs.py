"""What any peftcli command may delete or overwrite: one rule for train, merge, compare and export.

peftcli deletes or replaces only its own outputs, and only when asked:
- Every folder peftcli writes (a run, a merged model, a compare table) carries one marker file,
  `.peftcli`, naming its kind. `--overwrite` replaces a folder only when it carries the marker
  of the same kind (a run is replaced by a run, never by a merged model).
- A new output goes to a missing or empty folder. A non-empty folder without the marker is
  the user's and is refused, with or without `--overwrite`; so are the working directory (or a
  folder holding it), a folder inside another peftcli output, and a folder that holds, or lies
  inside, what the command reads (the recipe's data, the run being merged, the base model).
- An output is built beside its place (a hidden sibling) and renamed into place only once
  complete: an interrupted or failed command leaves the old output as it was.
- Files are written with the permissions the umask gives, like any other program's.

A file output (export's OUT.gguf) follows the same rule through `check_file`: an existing file
is replaced only with `--overwrite` and only when the command recognises it as its own.
Refusals are `UserError`s: exit status 2, one line, nothing touched.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from peftcli.errors import UserError

MARKER = ".peftcli"
LEGACY_RUN_MARKER = ".peftcli-run"  # the marker of runs made before MARKER had a kind
KINDS = ("run", "merge", "compare", "export")
HOLDS_RUNS = {"compare"}  # kinds whose folder holds runs of their own (compare: one per method)


def kind_of(folder: Path) -> str | None:
    """The kind of peftcli output `folder` is, by its marker; None for anything else."""
    marker = folder / MARKER
    if marker.is_file():
        try:
            kind = json.loads(marker.read_text(encoding="utf-8")).get("kind")
        except (OSError, ValueError, AttributeError):
            return None
        return kind if kind in KINDS else None
    if (folder / LEGACY_RUN_MARKER).is_file():
        return "run"
    return None


def mark(folder: Path, kind: str) -> None:
    """Mark `folder` as peftcli's output of `kind` (the one thing that lets it be replaced)."""
    assert kind in KINDS, kind
    created = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    (folder / MARKER).write_text(json.dumps({"kind": kind, "created": created}) + "\n", encoding="utf-8")


def shown(folder: Path) -> str:
    """A few of a folder's entries, to say what a refusal protects."""
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def inside(path: Path, folder: Path) -> bool:
    """`path` is `folder` or lies within it (both resolved)."""
    return path == folder or folder in path.parents


def check_location(
    out: Path, key: str, reads: Iterable[Path] = (), hint: str | None = None, reader: str = "this command"
) -> None:
    """Refuse an output folder that would be, hold or sit inside something that is not this
    command's to replace: a file, an unwritable place, another peftcli output, the working
    directory, or anything in `reads` (what the command reads: data, a source run, a model)."""
    hint = hint or f"choose a new folder for {key}"
    resolved = out.expanduser().resolve()
    existing = next(p for p in (resolved, *resolved.parents) if p.exists())
    if not existing.is_dir():
        shown_path = out if existing == resolved else existing
        raise UserError(f"{key}: {shown_path} is a file, not a folder", hint)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{key}: cannot write in {existing}", "choose a folder you can write to")
    outer = next((p for p in resolved.parents if (k := kind_of(p)) and k not in HOLDS_RUNS), None)
    if outer is not None:
        raise UserError(f"{key}: {out} is inside the peftcli {kind_of(outer)} {outer}", hint)
    if inside(Path.cwd().resolve(), resolved):
        raise UserError(
            f"{key}: {out} is the working directory or holds it; an output needs a folder of its own", hint
        )
    for path in reads:
        source = path.expanduser().resolve()
        if inside(source, resolved):
            raise UserError(
                f"{key}: {out} holds {path}, which {reader} reads; it needs a folder of its own", hint
            )
        if source.is_dir() and inside(resolved, source):
            raise UserError(f"{key}: {out} is inside {path}, which {reader} reads", hint)


def check_replace(out: Path, kind: str, key: str, overwrite: bool, hint: str | None = None) -> bool:
    """May a new `kind` output take `out`'s place? True when `out` holds an output to replace
    (and `--overwrite` says so), False when it is missing or empty; refuses everything else."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return False
    found = kind_of(out)
    if found is None:
        raise UserError(
            f"{key}: {out} is not a folder peftcli made (it holds {shown(out)}); peftcli replaces "
            "only its own outputs, with --overwrite",
            hint or f"choose a new or empty folder for {key}",
        )
    if found != kind:
        raise UserError(
            f"{key}: {out} holds a peftcli {found}, not a {kind} output; peftcli replaces an output "
            "only with one of its kind",
            hint or f"choose a new or empty folder for {key}",
        )
    if not overwrite:
        raise UserError(
            f"{key}: {out} already holds a peftcli {kind} output", "pass --overwrite to replace it"
        )
    return True


def check_file(path: Path, key: str, overwrite: bool, ours: Callable[[Path], bool], what: str) -> None:
    """The same rule for a single-file output: a missing path is fine; an existing file is
    replaced only with `--overwrite` and only when `ours(path)` recognises it as peftcli's."""
    if not path.exists():
        return
    if not path.is_file():
        raise UserError(f"{key}: {path} exists and is not a file")
    if not ours(path):
        raise UserError(
            f"{key}: {path} is not a {what} peftcli wrote; peftcli replaces only its own outputs",
            f"choose a new file name for {key}",
        )
    if not overwrite:
        raise UserError(f"{key}: {path} already exists", "pass --overwrite to replace it")


def work_folder(out: Path) -> Path:
    """A hidden, empty sibling of `out` to build the output in (see `swap_in`)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    follow_umask(work)
    return work


def swap_in(work: Path, out: Path) -> None:
    """Put the complete `work` in `out`'s place; an earlier output there (already allowed by
    `check_replace`) goes only after the new one is in place."""
    if not out.exists():
        os.rename(work, out)
        return
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
        os.rename(work, out)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rename(out, trash / out.name)
    os.rename(work, out)
    shutil.rmtree(trash, ignore_errors=True)


def write_text(path: Path, text: str) -> None:
    """Write a file whole or not at all (a hidden sibling renamed into place)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


# --------------------------------------------------------------------------- permissions


def umask() -> int:
    """The process's umask, read without changing it where Linux allows."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: read it by setting it, and put it back at once
    os.umask(mask)
    return mask


def follow_umask(path: Path) -> None:
    """Give `path` (and, for a folder, everything in it) the permissions the umask gives a new
    file or folder. safetensors writes 0600 and `tempfile.mkdtemp` makes 0700 folders, whatever
    the umask; everything peftcli writes follows the umask instead."""
    mask = umask()
    file_mode, dir_mode = 0o666 & ~mask, 0o777 & ~mask
    if path.is_symlink() or not path.exists():
        return
    if path.is_file():
        path.chmod(file_mode)
        return
    path.chmod(dir_mode)
    for root, dirs, files in os.walk(path):
        for name in dirs:
            if not os.path.islink(p := os.path.join(root, name)):
                os.chmod(p, dir_mode)
        for name in files:
            if not os.path.islink(p := os.path.join(root, name)):
                os.chmod(p, file_mode)
