"""One validation pass: everything that can refuse a recipe before anything heavy loads.

A recipe is checked in two steps. Reading it (`recipe_file.load_recipe`) validates the schema:
every key, type and value, the objective against the task and data (`objectives.objective_problem`)
and `peft.options` against the method's config class, all errors reported at once. Then
`validate(recipe)` runs the rest, once per process:

- the model fits the task and the method (`checks.check_model` → `methods.apply.check_fit`), its
  positions hold `data.max_length`, its target modules exist (from the weights' names);
- `peft.init_from`, the data (every row read and checked against its format), the trackers;
- the run folder's location (`run_folder.plan.check_location`: not the data, not the working
  directory, not inside another peftcli output);
- with a launch config, what it asks of this machine (`training.accelerator.check_launch_config`).

`peftcli validate` runs exactly the pass `train` runs, so it refuses what `train` would (short of
the folder's state: a run already there, another `train` holding it, which `train` decides when
it starts).
"""

from __future__ import annotations

from pathlib import Path

from peftcli import checks
from peftcli.recipe import Recipe
from peftcli.run_folder import plan as run_plan


def validate(recipe: Recipe, launch_config: Path | None = None) -> list[str]:
    """Run every check on a loaded recipe; raise `UserError` at the first problem, else return
    what was found, one line per check (notes end in `: ignored` or say where training starts)."""
    run_plan.check_location(recipe.output_dir, run_plan.protected_paths(recipe))
    lines = checks.check_recipe(recipe)
    if launch_config is not None:
        from peftcli.model.load import resolve_dtype
        from peftcli.training.accelerator import check_launch_config

        model, method = recipe.model, recipe.peft.method
        check_launch_config(launch_config, recipe.training, method, model.quantization, resolve_dtype(model))
    return lines
