"""What peftcli says to a person: progress on stderr, quiet libraries, sizes, and the one way a
command ends in `--json` or text."""

from __future__ import annotations

import logging
import sys
import warnings


def say(message: str) -> None:
    """Progress for humans: stderr, so `--json` stdout stays clean."""
    print(message, file=sys.stderr, flush=True)


def quiet_libraries() -> None:
    """peftcli reports progress itself; keep library chatter off the terminal."""
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    transformers.logging.disable_progress_bar()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="bitsandbytes")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*gradient checkpointing.*")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError
