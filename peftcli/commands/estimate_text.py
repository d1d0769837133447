"""`peftcli estimate`'s report: the plan as text, and what would lower it."""

from __future__ import annotations

from typing import Any

from peftcli.console import human_bytes
from peftcli.objectives import OBJECTIVES


def _variants(plan: dict[str, Any]) -> str:
    return f" ({'; '.join(plan['variants'])})" if plan.get("variants") else ""


def format_estimate(result: dict[str, Any]) -> str:
    plan, memory = result["plan"], result["memory"]
    gc = "on" if plan["gradient_checkpointing"] else "off"
    quant = f", {plan['quantization']} base" if plan["quantization"] != "none" else ""
    head = f": adapter {result['adapter_params']:,} + head {result['head_params']:,}"
    lines = [
        f"{plan['method']}{_variants(plan)} on {plan['model']} ({plan['task']}): {plan['dtype']}{quant}, "
        f"mixed precision {plan['mixed_precision']}, on {plan['device']}",
        f"parameters: {result['total_params']:,} total, {result['trainable_params']:,} trainable "
        f"({100 * result['trainable_share']:.3f}%)" + (head if result["head_params"] else ""),
        f"memory per process (batch {_batch(plan)} × {plan['max_length']} tokens, "
        f"gradient checkpointing {gc}):",
    ]
    if result.get("coverage"):  # after the parameters line: what the trainable ones reach
        from peftcli.methods.coverage import lines as coverage_lines

        lines[2:2] = coverage_lines(result["coverage"])
    if result.get("parts"):  # a vision-language model: each part's parameters, exact
        from peftcli.model.parts import part_lines

        full = "trained in full (PEFT holds a trained copy beside the original)"
        adapted = {
            p: (full if p == "projector" else "adapted") if c["trainable"] else "frozen"
            for p, c in result["parts"].items()
        }
        lines[2:2] = part_lines(result["parts"], adapted)
    for key in ("weights", "adapter", "optimizer", "gradients", "activations", "generation", "total"):
        if f"{key}_bytes" in memory:
            lines.append(f"  {key:<12} {human_bytes(memory[f'{key}_bytes']):>11}")
    if "generation" in result:  # GRPO: what its sampling and reference pass hold, before training's pass
        g = result["generation"]
        lines[-1:-1] = [
            f"    sampling {g['rows']} sequences: KV cache {human_bytes(g['kv_cache'])} ({g['cached_positions']} "
            f"positions each); reference pass {human_bytes(g['reference'])}; before the activations, not "
            "beside them: the total counts the larger"
        ]
    if plan["num_processes"] > 1:
        lines.append(
            f"  × {plan['num_processes']} processes = {human_bytes(plan['all_processes_bytes'])} "
            "(DDP: every process holds the whole model)"
        )
        from peftcli.training.sharded import format_fsdp

        lines += format_fsdp(result["fsdp"], plan["num_processes"], plan["quantization"], result["fits"])
    if result["fits"] is not None:
        need = memory["total_bytes"] + result["reserve_bytes"]
        verdict = "fits" if result["fits"] else "does not fit"
        margin = (
            f"{human_bytes(result['margin_bytes'])} to spare"
            if result["fits"]
            else f"{human_bytes(-result['margin_bytes'])} short (try {', '.join(savings(plan))})"
        )
        lines.append(
            f"{verdict} in {human_bytes(result['gpu_memory_bytes'])}: needs {human_bytes(need)} "
            f"with {human_bytes(result['reserve_bytes'])} for the CUDA context; {margin}"
        )
    lines += [f"note: {n}" for n in result["notes"]]
    objective = OBJECTIVES[plan.get("objective", "sft")]
    if not objective.task_loss:
        lines.append(
            f"note: {objective.name} scores the log-probabilities of whole answers (no fused head)"
            + (
                "; it samples a group of answers per prompt (batch × num_generations sequences of prompt"
                " + max_new_tokens, counted above); its reference is the base (the adapter disabled) or"
                " the starting adapter, in place: no second copy of the weights"
                if objective.generates
                else "; its reference is the same model with the adapter disabled (or the starting adapter), "
                "scored once before training without gradients: no second copy of the weights"
                if objective.reference
                else "; no reference model"
            )
        )
    return "\n".join(lines)


def _batch(plan: dict[str, Any]) -> str:
    if plan.get("sequences", plan["batch_size"]) != plan["batch_size"]:
        unit = "prompts" if OBJECTIVES[plan.get("objective", "sft")].generates else "pairs"
        return f"{plan['batch_size']} {unit} = {plan['sequences']} sequences"
    return str(plan["batch_size"])


def savings(plan: dict[str, Any]) -> list[str]:
    """What would lower the plan, among what the recipe does not already do."""
    out = [] if plan["gradient_checkpointing"] else ["training.gradient_checkpointing: true"]
    out.append("a smaller training.batch_size (with grad_accum to keep the global batch) or data.max_length")
    if plan["quantization"] == "none":
        out.append("model.quantization: 4bit")
    return out
