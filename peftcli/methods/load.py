"""Loading a saved adapter, of any method, onto a model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peftcli.errors import UserError
from peftcli.methods.saved import adapter_config, adapter_folder, check_method


def load_adapter(
    model: Any, folder: Path | str, adapter_name: str = "default", trainable: bool = False
) -> Any:
    """Put a saved adapter (any method, peftcli's own included) on `model`: the one way peftcli
    loads adapters. peftcli's tuners are registered with PEFT first, so a fresh process loads
    them like PEFT's own. A PeftModel gets the adapter added under `adapter_name`."""
    from peft import PeftModel

    from peftcli.methods import tuners  # noqa: F401  registers peftcli's own tuners with PEFT

    try:
        if isinstance(model, PeftModel):
            model.load_adapter(str(folder), adapter_name=adapter_name)
            return model
        return PeftModel.from_pretrained(
            model, str(folder), adapter_name=adapter_name, is_trainable=trainable
        )
    except Exception as exc:  # safetensors, PEFT and torch raise many types for a broken adapter
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load the adapter in {folder}: {first}") from None


def start_from(model: Any, path: Path | str, method: str) -> Any:
    """`model` with the adapter in `path` (a run or adapter folder) on it, trainable: training
    continues from its weights. The adapter must be of `method` (its settings come with it)."""
    folder, config = adapter_config(path)
    check_method(folder, config, method)
    return load_adapter(model, folder, trainable=True)


def wrap_like(model: Any, section: Any, task: str, total_steps: int | None = None) -> Any:
    """`model` wrapped as training wraps it: with the settings of `peft.init_from`'s adapter when
    the recipe starts from one (its weights are not read), else with the recipe's method."""
    if section.init_from is None:
        from peftcli.methods.apply import apply_method

        return apply_method(model, section, task, total_steps=total_steps)
    from peft import PeftConfig, get_peft_model

    from peftcli.methods import tuners  # noqa: F401  registers peftcli's own tuners with PEFT

    config = PeftConfig.from_pretrained(str(adapter_folder(section.init_from)))
    config.inference_mode = False  # it is trained on
    return get_peft_model(model, config)
