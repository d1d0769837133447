"""Loading a saved adapter, of any method, onto a model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peftcli.errors import UserError


def load_adapter(model: Any, folder: Path | str, adapter_name: str = "default") -> Any:
    """Put a saved adapter (any method, peftcli's own included) on `model`: the one way peftcli
    loads adapters. peftcli's tuners are registered with PEFT first, so a fresh process loads
    them like PEFT's own. A PeftModel gets the adapter added under `adapter_name`."""
    from peft import PeftModel

    from peftcli.methods import tuners  # noqa: F401  registers peftcli's own tuners with PEFT

    try:
        if isinstance(model, PeftModel):
            model.load_adapter(str(folder), adapter_name=adapter_name)
            return model
        return PeftModel.from_pretrained(model, str(folder), adapter_name=adapter_name)
    except Exception as exc:  # safetensors, PEFT and torch raise many types for a broken adapter
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load the adapter in {folder}: {first}") from None
