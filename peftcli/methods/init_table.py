"""The LoRA initialisations (`peft.init`) and variants a recipe can name: one row per
initialisation, and what the recipe's method and base refuse of them. The schema reads it, so it
imports nothing (each function takes the recipe's `peft` section, a `PeftSection`);
`methods/inits.py` does the work."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

# Methods whose config is PEFT's LoraConfig: the ones initialisations and variants apply to.
LORA_FAMILY = ("lora", "qlora", "dora")


@dataclass(frozen=True)
class Init:
    name: str
    summary: str  # what it is and what it costs (README, errors)
    methods: tuple[str, ...]  # peft.method values it works with
    peft_value: Any = None  # init_lora_weights; None: PEFT's default, then peftcli's own step
    mutates_base: bool = False  # moves B₀A₀ out of the base: saved converted (rank 2r)
    full_precision: bool = False  # needs an unquantized base (its SVD reads the weights)
    conv1d: bool = True  # works on GPT-2-style Conv1D layers (PEFT's OLoRA does not)
    needs_4bit: bool = False


INITS: dict[str, Init] = {
    i.name: i
    for i in [
        Init("default", "PEFT's default: A Kaiming-uniform, B = 0", LORA_FAMILY),
        Init("gaussian", "A Gaussian (σ = 1/r), B = 0", LORA_FAMILY, "gaussian"),
        Init(
            "pissa",
            "A, B from the top-r singular vectors of W (full SVD of every target weight)",
            ("lora",),
            "pissa",
            mutates_base=True,
            full_precision=True,
        ),
        Init(
            "olora",
            "A, B from a QR decomposition of W (orthonormal A)",
            ("lora",),
            "olora",
            mutates_base=True,
            full_precision=True,
            conv1d=False,
        ),
        Init(
            "loftq",
            "A, B fitted so that NF4(W) + s·BA ≈ W (one SVD per layer, original weights re-read from disk)",
            ("lora", "qlora"),
            needs_4bit=True,
        ),
        Init(
            "eva",
            "A from the SVD of the layers' inputs on the run's first training batches; ranks redistributed",
            ("lora", "qlora"),
            "eva",
        ),
    ]
}
FAST_PISSA = re.compile(r"pissa_niter_([1-9][0-9]?)")  # randomized SVD with N subspace iterations
INIT_NAMES = "default, gaussian, pissa, pissa_niter_N (N = 1..99), olora, loftq, eva"


def init_row(name: str) -> Init:
    return INITS["pissa"] if FAST_PISSA.fullmatch(name) else INITS[name]


def check_init_name(value: str) -> str:
    if value in INITS or FAST_PISSA.fullmatch(value):
        return value
    if value == "corda":
        raise ValueError(
            "corda is not supported: its covariance pass needs its own data and hooks, and its saved "
            "form could not be checked against the original base; use pissa or eva"
        )
    raise ValueError(f"unknown initialisation {value!r}; one of {INIT_NAMES}")


def variants_set(section: Any) -> list[str]:
    """The variant keys the recipe sets (shown by estimate and compare)."""
    out = [f"init {section.init}"] if section.init != "default" else []
    if section.rslora:
        out.append("rslora")
    if section.lora_plus_ratio is not None:
        out.append(f"lora+ ×{section.lora_plus_ratio:g}")
    if section.rank_pattern:
        out.append("rank_pattern " + ", ".join(f"{k}={v}" for k, v in section.rank_pattern.items()))
    if section.alpha_pattern:
        out.append("alpha_pattern " + ", ".join(f"{k}={v:g}" for k, v in section.alpha_pattern.items()))
    return out


def recipe_problem(section: Any, quantization: str) -> str | None:
    """What the recipe's init and variants cannot do with its method and base (validate's check)."""
    row = init_row(section.init)
    variant = [
        k
        for k, on in (
            ("rslora", section.rslora),
            ("lora_plus_ratio", section.lora_plus_ratio is not None),
            ("rank_pattern", bool(section.rank_pattern)),
            ("alpha_pattern", bool(section.alpha_pattern)),
        )
        if on
    ]
    if variant and section.method not in LORA_FAMILY:
        return f"peft.{variant[0]} applies to {', '.join(LORA_FAMILY)}, not peft.method: {section.method}"
    fixed = [k for k in ("rslora", "rank_pattern", "alpha_pattern") if k in variant]
    if fixed and section.init_from is not None:
        return f"peft.{fixed[0]}: the adapter of peft.init_from fixes it; remove peft.{fixed[0]}"
    if section.init == "default":
        return None
    if section.method not in row.methods:
        return (
            f"peft.init: {section.init} does not work with peft.method: {section.method}; "
            f"it works with {', '.join(row.methods)}"
        )
    if section.init_from is not None:
        return f"peft.init: {section.init} initialises a new adapter; with peft.init_from remove peft.init"
    if row.needs_4bit and quantization != "4bit":
        return f"peft.init: loftq fits an adapter to a 4-bit base; use peft.method: qlora (model.quantization is {quantization})"
    if row.full_precision and quantization != "none":
        return (
            f"peft.init: {section.init} needs a full-precision base (the converted adapter is exact only on "
            f"unquantized weights), and model.quantization is {quantization}; use lora without quantization"
        )
    if row.mutates_base and section.rslora and (section.rank_pattern or section.alpha_pattern):
        return (
            f"peft.init: {section.init} with peft.rslora and a rank or alpha pattern cannot be saved in a form "
            "that applies to the original base (PEFT's conversion refuses it); drop one of them"
        )
    return None
