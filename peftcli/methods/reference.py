"""Trainable-parameter shares of every method on a reference architecture, for `peftcli methods`.

Computed on the meta device (no weights) by `python -m peftcli.methods.reference`, which rewrites
`method_shares.json`; a test recomputes them, so the shipped numbers cannot go stale.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TABLE = Path(__file__).with_name("method_shares.json")
# Llama-3.1-8B's shape; the recipe defaults (r=8, all-linear, 16 virtual tokens) for each method.
REFERENCE = {
    "name": "Llama-3.1-8B",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
}


def compute() -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from peftcli.methods import METHODS
    from peftcli.methods.apply import apply_method
    from peftcli.recipe import PeftSection

    config = LlamaConfig(**{k: v for k, v in REFERENCE.items() if k != "name"})
    shares = {}
    for name in METHODS:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        total = sum(p.numel() for p in model.parameters())
        peft_model = apply_method(model, PeftSection(method=name), "causal_lm", total_steps=1000)
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        shares[name] = {"trainable_params": trainable, "share": trainable / total}
    return {"reference": REFERENCE["name"], "total_params": total, "methods": shares}


def load() -> dict[str, Any]:
    return json.loads(TABLE.read_text()) if TABLE.is_file() else {"reference": None, "methods": {}}


if __name__ == "__main__":
    from peftcli.console import quiet_libraries

    quiet_libraries()
    TABLE.write_text(json.dumps(compute(), indent=1) + "\n")
    print(f"wrote {TABLE}")
