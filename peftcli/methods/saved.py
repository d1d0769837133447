"""A saved adapter as a recipe meets it (`peft.init_from`): the adapter folder of a run, a
checkpoint or an adapter folder; its adapter_config.json; the method that made it; the settings
a recipe takes from it. Reads JSON only: the recipe adopts these settings while it is read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peftcli.errors import UserError
from peftcli.run_folder.layout import (
    Layout,
    adapter_file,
    all_checkpoints,
    checkpoint_adapter,
    has_adapter,
    is_checkpoints,
)


def adapter_folder(path: Path | str, key: str = "peft.init_from") -> Path:
    """The adapter folder of a run folder or of one of its checkpoints (their adapter/), or of
    an adapter folder itself."""
    path = Path(path).expanduser()
    for folder in (Layout(path).adapter, path):
        if has_adapter(folder):
            return folder
    if not path.exists():
        steps = [p.name for p in all_checkpoints(path.parent)] if is_checkpoints(path.parent) else []
        hint = f"the run's checkpoints are {', '.join(steps)}" if steps else None
        raise UserError(f"{key}: no such run, checkpoint or adapter folder: {path}", hint)
    started = [p for p in all_checkpoints(Layout(path).checkpoints) if has_adapter(checkpoint_adapter(p))]
    if started:
        raise UserError(
            f"{key}: the run {path} has not finished (it holds no adapter/)",
            f"start from one of its checkpoints, e.g. {started[-1]}",
        )
    raise UserError(
        f"{key}: {path} holds no adapter (adapter_config.json)",
        "give a finished run, one of its checkpoints/step-N, or an adapter folder",
    )


def adapter_config(path: Path | str) -> tuple[Path, dict[str, Any]]:
    """The adapter folder of `path` (see adapter_folder) and its adapter_config.json."""
    import json

    folder = adapter_folder(path)
    try:
        config = json.loads(adapter_file(folder).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"peft.init_from: {folder}/adapter_config.json is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise UserError(f"peft.init_from: {folder}/adapter_config.json is not a JSON object")
    return folder, config


def check_method(folder: Path, config: dict[str, Any], method: str) -> None:
    """The adapter was made by `method` (its settings come with it)."""
    from peftcli.methods.table import METHODS, method_of

    found = method_of(config.get("peft_type", ""), config)
    wanted = METHODS[method]
    if found is None or found.peft_type != wanted.peft_type or found.fixed != wanted.fixed:
        name = found.name if found else config.get("peft_type")
        raise UserError(
            f"peft.init_from: {folder} is a {name} adapter, and peft.method is {method}",
            f"set peft.method: {name}, or start from a {method} adapter",
        )


def adopt_settings(section: Any, refuse: bool = True) -> list[str]:
    """Make `section` (the recipe's peft) say what the `init_from` adapter really is: the
    settings the recipe leaves unset are taken from the adapter (so the run's recipe.yaml is
    true); one the recipe sets to another value is refused, naming both — unless `refuse` is
    false (a finished run's recorded recipe, which an older peftcli may have written with the
    recipe's value instead of the adapter's: the adapter wins). Returns the settings
    taken, as `key=value`. A missing folder is left to the checks (a recorded recipe may name
    one that is gone)."""
    from peftcli.methods.table import METHODS

    try:
        folder, config = adapter_config(section.init_from)
    except UserError:
        return []
    check_method(folder, config, section.method)
    method = METHODS[section.method]
    keys = {key: name for key, name in method.generic.items()}
    if method.kind == "targets":
        keys.update({"target_modules": "target_modules", "layers": "layers_to_transform"})
    taken, conflicts = [], []
    for key, name in keys.items():
        have = config.get(name)
        if have is None and key != "layers":
            continue
        if isinstance(have, list):
            have = sorted(have) if key == "target_modules" else have
        if isinstance(have, int) and key == "layers":
            have = [have]
        mine = getattr(section, key)
        if key in section.model_fields_set and refuse:
            # A keyword or regex, or layers counted from the end, mean names only on the model.
            comparable = (
                isinstance(mine, list)
                if key == "target_modules"
                else not (key == "layers" and any(i < 0 for i in mine or []))
            )
            differs = comparable and (
                sorted(mine) != have if key == "target_modules" and isinstance(have, list) else mine != have
            )
            if differs:
                conflicts.append(f"peft.{key}: {mine} (the adapter has {name}={have})")
        elif mine != have:
            setattr(section, key, have)
            taken.append(f"{key}={have}")
    for key, value in section.options.items():
        if refuse and key in config and config[key] != value:
            conflicts.append(f"peft.options.{key}: {value} (the adapter has {config[key]})")
    if conflicts:
        raise UserError(
            f"peft.init_from: the recipe sets what the adapter in {folder} fixes: " + "; ".join(conflicts),
            "remove these keys (the adapter's settings are used) or set them to its values",
        )
    return taken
