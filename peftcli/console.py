"""What peftcli says to a person: progress on stderr, quiet (or silenced) libraries, sizes read
and written, and the one way a command ends in `--json` or text."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any

from peftcli.errors import UserError

_UNITS = {"": 2**30, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def is_main_process() -> bool:
    """Whether this process speaks for the run: Accelerate's launcher gives each process its
    RANK; a plain run is rank 0. Known before any Accelerator exists."""
    return os.environ.get("RANK", "0") == "0"


def say(message: str) -> None:
    """Progress for humans: stderr, so `--json` stdout stays clean."""
    print(message, file=sys.stderr, flush=True)


def emit(result: Any, json_out: bool, format_text: Callable[[Any], str] | None = None) -> None:
    """How every command ends: with `json_out`, `result` as one JSON document on stdout and
    nothing else; otherwise `format_text(result)`. Without `format_text`, JSON either way."""
    if json_out or format_text is None:
        sys.stdout.write(json.dumps(result, indent=2, default=str) + "\n")
        sys.stdout.flush()
        return
    import typer

    typer.echo(format_text(result))


# bitsandbytes (0.50) on a CPU with AVX512-BF16 fetches a CPU kernel for its packed 4-bit path from
# the Hugging Face Hub when it is imported, through the `kernels` package (a dependency of
# transformers since 5.25): online that downloads and runs code nobody asked for, offline it prints
# a warning. peftcli keeps every 4-bit layer off that path (peftcli.model.quant), so the fetch is
# refused and bitsandbytes uses its own kernels.
HUB_KERNELS_REFUSED = ("kernels-community/quantization-bitsandbytes",)


def refuse_hub_kernels() -> None:
    """Make `kernels.get_kernel` refuse HUB_KERNELS_REFUSED (once; before bitsandbytes is imported)."""
    try:
        import kernels
    except ImportError:
        return
    if getattr(kernels.get_kernel, "_peftcli_guard", False):
        return
    fetch = kernels.get_kernel

    def get_kernel(repo_id: str, *args: Any, **kwargs: Any) -> Any:
        if repo_id in HUB_KERNELS_REFUSED:
            raise ImportError(f"peftcli does not fetch {repo_id} (its 4-bit layers do not use it)")
        return fetch(repo_id, *args, **kwargs)

    get_kernel._peftcli_guard = True  # type: ignore[attr-defined]
    kernels.get_kernel = get_kernel


def quiet_libraries() -> None:
    """peftcli reports progress itself; keep library chatter off the terminal."""
    refuse_hub_kernels()
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    transformers.logging.disable_progress_bar()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="bitsandbytes")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*gradient checkpointing.*")


@contextlib.contextmanager
def silenced() -> Iterator[None]:
    """Swallow what libraries print while probed: warnings, logging, and C-level writes to fd 1/2."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved: list[tuple[int, int]] = []
    with contextlib.suppress(OSError):  # no real descriptors (an embedding host): the rest still applies
        devnull = os.open(os.devnull, os.O_WRONLY)
        for fd in (1, 2):
            saved.append((fd, os.dup(fd)))
            os.dup2(devnull, fd)
        os.close(devnull)
    disabled = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(disabled)
        with contextlib.suppress(Exception):  # C stdio buffers, so they are not written after the restore
            import ctypes

            ctypes.CDLL(None).fflush(None)
        for fd, copy in saved:
            os.dup2(copy, fd)
            os.close(copy)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def parse_memory(text: str) -> int:
    """'24GB', '80GiB', '40g', '16000MB' → bytes. GPU memory is quoted in binary units (a "24 GB"
    card has 24 GiB), so GB and GiB both mean 2**30; a bare number is GiB."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([bkmgt]?)(?:i?b)?\s*", text.lower())
    if not match:
        raise UserError(f"--gpu-memory: cannot read `{text}`", "write it like 24GB, 80GiB or 16000MB")
    return int(float(match[1]) * _UNITS[match[2]])
