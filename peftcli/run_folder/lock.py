"""One writer per run: `train` holds a lock beside the run folder for its whole life; a second
`train` of the same folder is refused naming the first. A lock whose holder died is stale (same
host: the pid is gone or belongs to a younger process)."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from peftcli.errors import UserError
from peftcli.home import proc_stat, process_alive
from peftcli.run_folder.layout import Layout


def _start_ticks(pid: int) -> int | None:
    """The process's start time (Linux clock ticks since boot): tells a pid from its reuse."""
    fields = proc_stat(pid)
    return int(fields[19]) if fields and len(fields) > 19 else None


def _alive(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname():
        return True  # cannot tell from here: assume it runs
    pid = int(holder.get("pid", -1))
    if not process_alive(pid):
        return False
    ticks = _start_ticks(pid)
    return ticks is None or holder.get("start") in (None, ticks)


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def holder_line(holder: dict, lock: Path) -> str:
    return (
        f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}"
        f" (lock {lock})"
    )


def check_free(run_dir: Path) -> None:
    """Refuse if a live process holds the run (read-only; the launcher checks before starting)."""
    lock = Layout(run_dir).lock
    holder = _read(lock)
    if holder and _alive(holder):
        raise _busy(run_dir, holder, lock)


def _busy(run_dir: Path, holder: dict, lock: Path) -> UserError:
    return UserError(
        f"{run_dir} is being trained by another peftcli: {holder_line(holder, lock)}",
        "wait for it to finish or stop it; if that process is gone, delete the lock file",
    )


class RunLock:
    """`train`'s claim on a run folder, from before the folder is touched until the process ends."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.path = Layout(run_dir).lock
        self.held = False
        self.made: Path | None = None  # the outermost folder acquire() created for the lock

    def acquire(self) -> RunLock:
        missing = [p for p in (self.path.parent, *self.path.parent.parents) if not p.exists()]
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.made = missing[-1] if missing else None
        except OSError as exc:
            raise _unwritable(self.run_dir, exc) from None
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "start": _start_ticks(os.getpid()),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(me) + "\n", encoding="utf-8")
            for _ in range(3):
                try:
                    os.link(tmp, self.path)  # atomic: fails if any lock exists
                    self.held = True
                    return self
                except FileExistsError:
                    holder = _read(self.path)
                    if holder is None:
                        continue  # released meanwhile
                    if holder == {} and time.time() - self._mtime() < 5:
                        time.sleep(0.2)  # being written right now
                        continue
                    if holder and _alive(holder):
                        raise _busy(self.run_dir, holder, self.path) from None
                    self.path.unlink(missing_ok=True)  # stale: its holder died
        except OSError as exc:
            raise _unwritable(self.run_dir, exc) from None
        finally:
            tmp.unlink(missing_ok=True)
        raise UserError(f"could not take the lock {self.path}", "try again")

    def _mtime(self) -> float:
        try:
            return self.path.stat().st_mtime
        except OSError:
            return 0.0

    def release(self) -> None:
        """Give the run back; the folders made only to hold the lock go too, if still empty
        (a refused `train` leaves nothing behind)."""
        if self.held:
            holder = _read(self.path)
            if holder and holder.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False
        for folder in (self.path.parent, *self.path.parent.parents) if self.made else ():
            try:
                folder.rmdir()
            except OSError:
                break  # not empty: the run is in it
            if folder == self.made:
                break


def _unwritable(run_dir: Path, exc: OSError) -> UserError:
    return UserError(
        f"training.output_dir: cannot write {run_dir}: {exc.strerror or exc}",
        "choose a folder you can write to",
    )


def writable(path: Path) -> None:
    """Turn an OSError making `path` into the one-line error a user can act on."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _unwritable(path, exc) from None
