"""A launched process's side of a failed group: what it records for its launcher, and how a
restarted group continues its run.

`peftcli train --num-processes/--launch-config` gives its processes a folder of its own on this
machine (`PEFTCLI_FAULTS`). Each group writes there who is who (`roster.json`: rank, machine,
host, pid); a process that loses a peer writes what it saw (`lost-RANK.json`) and exits with
`LOST` at once, without a traceback; the launcher writes how its local processes ended
(`exit-N.json`). The launcher reads these to say in one line what was lost; a restarted group
reads them to say why it restarted.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from peftcli import outputs

FAULTS = "PEFTCLI_FAULTS"  # the launcher's folder for this machine
RESTARTS = "PEFTCLI_MAX_RESTARTS"  # --max-restarts, as every launcher was given it
LOST = 3  # exit status of a process that lost a peer
ROSTER = "roster.json"


def folder() -> Path | None:
    value = os.environ.get(FAULTS)
    return Path(value) if value else None


def write(name: str, record: dict[str, Any], where: Path | None = None) -> None:
    where = where or folder()
    if where is not None:
        outputs.write_text(where / name, json.dumps({**record, "time": time.time()}))


def read(where: Path, pattern: str) -> list[dict[str, Any]]:
    """The records matching `pattern`, oldest first."""
    found = []
    for path in where.glob(pattern):
        try:
            found.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue
    return sorted(found, key=lambda r: r.get("time", 0))


def is_peer_error(exc: BaseException) -> bool:
    """An error a collective raises when another process of the group is gone or silent."""
    import torch.distributed as dist

    text = str(exc)
    return isinstance(exc, dist.DistError) or (
        isinstance(exc, RuntimeError) and any(w in text for w in ("gloo", "NCCL", "Connection", "Timed out"))
    )


@contextmanager
def reported() -> Iterator[None]:
    """In a launched process: a lost peer is recorded for the launcher, which reports it in one
    line; this process ends at once (a collective cannot be finished without the peer). The run
    folder is untouched: checkpoints are renamed into place only when every process wrote them."""
    try:
        yield
    except Exception as exc:
        debug = os.environ.get("PEFTCLI_DEBUG", "") not in ("", "0")
        if folder() is None or debug or not is_peer_error(exc):
            raise
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        text = re.sub(r"^\[[^\]]*\.\w+:\d+\] ", "", text)  # gloo's source location
        peer = re.search(r"\[([^\]]+)\]:(\d+)", text)
        rank = int(os.environ.get("RANK", "0"))
        write(
            f"lost-{rank}.json",
            {
                "rank": rank,
                "machine": int(os.environ.get("GROUP_RANK", "0")),
                "peer": f"{peer[1]}:{peer[2]}" if peer else None,
                "error": text[:300],
            },
        )
        sys.stderr.flush()
        # A moment before going, so that the launcher's agent sees first the process that
        # really failed (it names only the first failure it sees).
        time.sleep(float(os.environ.get("PEFTCLI_LOST_WAIT", "1")))
        os._exit(LOST)  # interpreter teardown could wait on the broken process group


def may_restart() -> bool:
    return int(os.environ.get(RESTARTS, "0") or 0) > 0


def agreed_restarts(accelerator: Any) -> int:
    """How many times the group was restarted, agreed by every process: a machine whose own
    processes did not fail restarts them without counting it (torch's membership change)."""
    import torch

    count = torch.tensor([int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))], device=accelerator.device)
    return int(accelerator.gather(count).max()) if accelerator.num_processes > 1 else int(count.item())


def restart_flags(run_dir: Path, overwrite: bool, resume: bool) -> tuple[bool, bool]:
    """A restarted group continues what the failed one left, as `--resume` would; where it left
    nothing to continue (it failed before opening the run folder), it starts as first asked."""
    from peftcli.run_folder.layout import Layout, has_checkpoints, is_run, is_unfinished

    partial = Layout(run_dir).partial
    if (is_run(partial) and has_checkpoints(partial)) or (is_run(run_dir) and is_unfinished(run_dir)):
        return False, True
    return overwrite, resume


def what_ended(where: Path) -> tuple[int, float, str] | None:
    """What ended this machine's part of its last group, as (priority, time, words): a local
    process killed by a signal, one that vanished without a word (no record of a lost peer),
    one that exited with an error, else the peer its processes lost. None when unknown."""
    groups = read(where, ROSTER)
    if not groups:
        return None
    since, ranks = groups[-1]["time"], groups[-1]["ranks"]
    local = {r["pid"]: r for r in ranks if r.get("faults") == str(where)}
    exits = [e for e in read(where, "exit-*.json") if e["time"] >= since and e["pid"] in local]
    losses = [x for x in read(where, "lost-*.json") if x["time"] >= since]
    named = lambda r: f"rank {r['rank']} on {r['host']}"  # noqa: E731
    for e in exits:
        if e["exitcode"] < 0:
            return 3, e["time"], f"{named(local[e['pid']])} exited with signal {-e['exitcode']}"
    crashed = [e for e in exits if e["exitcode"] != LOST]
    if crashed:
        return (
            1,
            crashed[0]["time"],
            f"{named(local[crashed[0]['pid']])} exited with status {crashed[0]['exitcode']}",
        )
    spoke = {x["rank"] for x in losses}
    silent = [r for r in local.values() if r["rank"] not in spoke]
    if losses and silent:
        return 2, losses[-1]["time"], f"{named(silent[0])} exited without a word (killed?)"
    if losses:
        mine = losses[-1]
        others = [r for r in ranks if r["machine"] != mine["machine"]]
        who = ", ".join(named(r) for r in others) or "a peer"
        peer = f" at {mine['peer']}" if mine.get("peer") else ""
        return 0, mine["time"], f"lost {who}{peer} ({mine['error'][:60].rstrip('. ')})"
    return None


def local_cause() -> tuple[int, float, str] | None:
    where = folder()
    if where is None or os.environ.get("LOCAL_RANK", "0") != "0":
        return None
    return what_ended(where)


def note_group(accelerator: Any, restarts: int) -> str | None:
    """Every process of a launched group: say who is who for the launcher (after a restart,
    first find out why it restarted). Returns the restart's cause on the main process."""
    if folder() is None:
        return None
    from accelerate.utils import gather_object

    many = accelerator.num_processes > 1
    cause = None
    if restarts:
        causes = [c for c in (gather_object([local_cause()]) if many else [local_cause()]) if c]
        cause = max(causes)[2] if causes else "a failure"
    me = {
        "rank": accelerator.process_index,
        "machine": int(os.environ.get("GROUP_RANK", "0")),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "faults": str(folder()),
    }
    ranks = gather_object([me]) if many else [me]
    if os.environ.get("LOCAL_RANK", "0") == "0":
        write(ROSTER, {"ranks": ranks})
    return cause


def restart_line(restarts: int, cause: str | None, start: Path | None) -> str:
    limit = os.environ.get(RESTARTS, "?")
    where = f"continuing from {start.parent.name}/{start.name}" if start else "starting again from step 0"
    return f"peftcli: restart {restarts} of {limit} after {cause or 'a failure'}; {where}"
