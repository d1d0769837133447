"""How far a merge moved the model from its base: `peftcli merge`'s report.

Each adapted layer is merged by PEFT itself, one at a time, with a copy of that one base
weight kept only while it is compared (so the report costs one layer's memory, for every
method); then PEFT unloads the adapter as usual. The logits of a few eval rows are taken
from the base (adapter disabled), the adapter and the merged model.
"""

from __future__ import annotations

import warnings
from typing import Any

ROWS = 4  # eval rows whose logits are compared


def measured_merge(model: Any, names: list[str], rows: list[dict[str, Any]], task: str) -> tuple[Any, dict]:
    """Fold the adapters `names` of the PeftModel `model` into its weights; returns the merged
    model and what changed: the largest relative weight change (‖W' − W‖ / ‖W‖, Frobenius)
    and the largest logit change against the base and against the unmerged adapter."""
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    with torch.no_grad():
        with model.disable_adapter():
            base_logits = [_logits(model, row, task) for row in rows]
        adapter_logits = [_logits(model, row, task) for row in rows]
        largest, where, changed, layers = 0.0, None, 0, 0
        for name, module in model.get_base_model().named_modules():
            if not isinstance(module, BaseTunerLayer) or module.merged:
                continue
            weight = _weight(module)
            before = weight.detach().clone()
            module.merge(safe_merge=True, adapter_names=names)
            layers += 1
            change = (_weight(module).detach() - before).norm().item() / max(before.norm().item(), 1e-30)
            changed += change > 0
            if change > largest or where is None:
                largest, where = change, _clean(name, module)
        with warnings.catch_warnings():  # "All adapters are already merged": they are, one by one
            warnings.simplefilter("ignore")
            merged = model.merge_and_unload(adapter_names=names)
        merged_logits = [_logits(merged, row, task) for row in rows]
    report = {
        "layers": layers,
        "changed_layers": int(changed),
        "largest_relative_weight_change": largest,
        "largest_change_in": where,
        "rows": len(rows),
        "logit_change_from_base": _largest(merged_logits, base_logits),
        "logit_change_from_adapter": _largest(merged_logits, adapter_logits),
    }
    return merged, report


def _weight(module: Any) -> Any:
    """The tensor a tuner layer merges into: its base layer's weight, or (LoRA on a parameter,
    PEFT's target_parameters) that parameter."""
    base = module.get_base_layer()
    return getattr(base, getattr(module, "parameter_name", None) or "weight")


def _clean(name: str, module: Any) -> str:
    path = ".".join(p for p in name.split(".") if p != "base_layer")
    return f"{path}.{getattr(module, 'parameter_name', None) or 'weight'}"


def _logits(model: Any, row: dict[str, Any], task: str) -> Any:
    import torch

    device = next(model.parameters()).device
    ids = torch.tensor([row["input_ids"]], device=device)
    kwargs = {"labels": torch.tensor([row["labels"]], device=device)} if task == "seq2seq_lm" else {}
    # An image+text row's images, as the processor's inputs (pixel_values, ...) read by `merge`.
    kwargs.update({key: value.to(device) for key, value in row.get("image_inputs", {}).items()})
    return model(input_ids=ids, **kwargs).logits.float().cpu()


def _largest(a: list[Any], b: list[Any]) -> float | None:
    return max(((x - y).abs().max().item() for x, y in zip(a, b, strict=True)), default=None)


def describe(report: dict[str, Any]) -> list[str]:
    """The lines `merge` prints; a warning when the adapter changed nothing."""
    out = [
        f"peftcli: merge moved {report['changed_layers']} of {report['layers']} adapted weights; largest "
        f"relative change {report['largest_relative_weight_change']:.3g} ({report['largest_change_in']})"
    ]
    if report["logit_change_from_base"] is not None:
        out.append(
            f"peftcli: logits on {report['rows']} eval rows: largest change from the base "
            f"{report['logit_change_from_base']:.4g}, from the unmerged adapter "
            f"{report['logit_change_from_adapter']:.3g}"
        )
    if report["changed_layers"] == 0:
        out.append(
            "peftcli: warning: the adapter changes nothing: every merged weight equals the base's "
            "(an untrained adapter, e.g. a LoRA whose B is still zero?)"
        )
    return out
