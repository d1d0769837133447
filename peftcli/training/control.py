"""Ctrl-C and SIGTERM while training: the loop finishes its step, checkpoints and stops."""

from __future__ import annotations

import sys
import time
from typing import Any

import torch

from peftcli.console import is_main_process


class Control:
    """Ctrl-C and SIGTERM while training: finish the step, checkpoint, stop (see `fit`).

    The first signal asks the loop to stop after the current optimizer step; a second Ctrl-C
    (a second later or more: a launcher relaying the first one does not count) stops at once.
    With several processes they agree every step on whether any of them was asked to stop."""

    def __init__(self) -> None:
        self.step = 0  # optimizer steps finished by this run
        self.signal: int | None = None
        self.at = 0.0
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> Control:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        import signal

        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        import signal

        if self.signal is None:
            self.signal, self.at = signum, time.monotonic()
            if is_main_process():
                print(
                    f"\npeftcli: {signal.Signals(signum).name}: stopping after step {self.step + 1} "
                    "(press Ctrl-C again to stop at once)",
                    file=sys.stderr,
                    flush=True,
                )
        elif signum == signal.SIGINT and time.monotonic() - self.at > 1.0:
            raise KeyboardInterrupt

    def stop_requested(self, accelerator: Any, sync: bool = True) -> int:
        """The signal that asks to stop (0 for none), agreed by every process. With several
        processes they agree only on `sync` steps (logged, evaluated or checkpointed ones: the
        loop reads numbers back there anyway), so a signal stops them at the next such step."""
        asked = self.signal or 0
        if accelerator.num_processes > 1:
            if not sync:
                return 0
            flag = torch.tensor([asked], device=accelerator.device)
            asked = int(accelerator.gather(flag).max())
        return asked
