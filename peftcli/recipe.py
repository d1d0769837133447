"""The recipe's schema: one strict pydantic model per section, every default and every
validator next to the fields it owns. A boolean is not a number and a string is not a boolean;
paths are expanded (`~`) once, here, so every later check sees the path that is used.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from peftcli.methods.table import METHODS, canonical_method
from peftcli.objectives import OBJECTIVES, DpoLoss, Objective, objective_problem
from peftcli.objectives.rl_section import GrpoSection
from peftcli.tasks import TASKS, Task

MethodName = Literal[tuple(METHODS)]  # type: ignore[valid-type]
Metric = Literal[
    "loss", "perplexity", "exact_match", "accuracy", "f1", "preference_accuracy", "reward_accuracy",
    "reward_margin", "reward",
]  # fmt: skip
DataFormat = Literal[
    "auto", "text", "completion", "alpaca", "messages", "sharegpt", "classification", "preference",
    "unpaired", "prompts",
]  # fmt: skip
MAX_SEED = 2**32 - 1  # numpy's limit; training seeds numpy, torch and random with it


class _Section(BaseModel):
    # No NaN or infinity: `lr: .inf` or `epochs: .nan` is a typo, never a setting. Strict: `yes`
    # is not 1 and "no" is not false (an integer still fills a float: `lr: 1`).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False, strict=True)


def _expand(value: str | None) -> str | None:
    """`~` expanded once, at the edge: the path every later check and every write sees."""
    return os.path.expanduser(value) if isinstance(value, str) and value.startswith("~") else value


# A run's name is one folder name under runs/: never a path (`../x`, `/etc/x`, `.`).
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")
NAME_RULE = "letters, digits, '.', '_', '+' and '-', starting with a letter or digit, at most 100 characters"
# Hugging Face's rule for a repo id: [org/]name, each part of letters, digits, '-', '_', '.',
# not starting or ending with '-' or '.', no '--' or '..', at most 96 characters.
_HUB_PART = r"(?!.*(?:--|\.\.))[A-Za-z0-9_](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?"
HUB_ID = re.compile(rf"(?:{_HUB_PART}/)?{_HUB_PART}")


def default_name(stem: str) -> str:
    """A run name from a recipe file's name: what NAME allows, the rest replaced by '-'."""
    name = re.sub(r"[^A-Za-z0-9._+-]+", "-", stem).lstrip("._+-")[:100]
    return name or "run"


class ModelSection(_Section):
    name_or_path: str = Field(
        description="Hub id, local model folder, or builtin:<name> (see `peftcli methods`)."
    )
    task: Task = Field("causal_lm", description="What the model is trained to do.")
    dtype: Literal["auto", "float32", "bfloat16", "float16", "float64"] = Field(
        "auto",
        description="Weight dtype; auto = bfloat16 on GPUs that support it, float32 on CPU "
        "(float64: for checking results to the last digit, not for speed).",
    )
    quantization: Literal["none", "4bit", "8bit"] = Field(
        "none", description="Load the base quantized with bitsandbytes (4bit = NF4 + double quantization)."
    )
    trust_remote_code: bool = Field(
        False, description="Run model code shipped with the checkpoint (pin `revision`)."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to load.")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] | None = Field(
        None, description="Attention kernel; null = the library default."
    )
    num_labels: int | None = Field(
        None, gt=1, description="Number of classes (seq_cls only); null = the number of labels in the data."
    )

    @field_validator("name_or_path")
    @classmethod
    def _folder_or_hub_id(cls, value: str) -> str:
        value = _expand(value) or value
        if value.startswith(("builtin:", ".", "/", "~")) or Path(value).exists():
            return value  # a path: whether it is a model folder is checked where it is read
        if len(value) > 96 or not HUB_ID.fullmatch(value):
            raise ValueError(
                "not a local folder, and not a hub id (org/name: letters, digits, '-', '_', '.'); "
                "check the path, or give builtin:<name>"
            )
        return value

    @model_validator(mode="after")
    def _num_labels_for_classifiers(self) -> ModelSection:
        if self.num_labels is not None and self.task != "seq_cls":
            raise ValueError(f"model.num_labels applies to model.task: seq_cls, not {self.task}; remove it")
        return self


class PeftSection(_Section):
    method: MethodName = Field(description="PEFT method; '-' and '_' are interchangeable.")
    target_modules: list[str] | str | None = Field(
        None,
        description="Modules to adapt: null (the method's default), a list of names, a regex, "
        "or one of all-linear | attention | mlp.",
    )
    layers: list[int] | None = Field(
        None, description="Indices of the layers to adapt (negative counts from the end); null = all."
    )
    r: int = Field(8, gt=0, description="Rank of the low-rank update.")
    alpha: float = Field(16, gt=0, description="Scaling numerator (LoRA: update scaled by alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter's input.")
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="Any further keyword of the method's PEFT config class, passed through.",
    )
    init: str = Field(
        "default",
        description="LoRA init (lora, qlora, dora): default | gaussian | pissa | pissa_niter_N | olora | loftq "
        "(qlora) | eva (the run's first batches). PiSSA/OLoRA are saved converted (rank 2r) for the original base.",
    )
    rslora: bool = Field(False, description="Rank-stabilised LoRA: the update scaled by alpha/sqrt(r).")
    train_projector: bool = Field(
        False, description="Vision-language: train the projector (image features -> text embeddings) in full."
    )
    train_vision: bool = Field(
        False, description="Vision-language: the method's targets in the vision tower too; else frozen."
    )
    lora_plus_ratio: float | None = Field(None, gt=0, description="LoRA+: B learns at this × training.lr.")
    rank_pattern: dict[str, int] = Field(
        default_factory=dict, description="Per-module r: name or regex -> r."
    )
    alpha_pattern: dict[str, float] = Field(
        default_factory=dict, description="Per-module alpha: name -> alpha."
    )
    init_from: str | None = Field(
        None,
        description="Start from a trained adapter: a run folder, one of its checkpoints/step-N, or an "
        "adapter folder, of the same method (e.g. an SFT run before DPO). The run takes its r, alpha, "
        "dropout, target_modules and layers (recorded in the run's recipe.yaml); setting one of them to "
        "another value is an error. Preference objectives use it, frozen, as the reference.",
    )

    @field_validator("method", mode="before")
    @classmethod
    def _normalise_method(cls, value: Any) -> Any:
        return canonical_method(value) if isinstance(value, str) else value

    @field_validator("init_from")
    @classmethod
    def _expand_init_from(cls, value: str | None) -> str | None:
        return _expand(value)

    @field_validator("init")
    @classmethod
    def _known_init(cls, value: str) -> str:
        from peftcli.methods.init_table import check_init_name

        return check_init_name(value)

    @field_validator("rank_pattern")
    @classmethod
    def _positive_ranks(cls, value: dict[str, int]) -> dict[str, int]:
        if any(v < 1 for v in value.values()):
            raise ValueError("a rank is at least 1")
        return value

    @model_validator(mode="after")
    def _options_fit(self) -> PeftSection:
        from peftcli.methods.options import options_problems

        if problems := options_problems(METHODS[self.method], self.options):
            raise ValueError("; ".join(problems))
        return self


class DataSection(_Section):
    train: str = Field(
        description="Training data: a .jsonl/.json/.csv/.tsv/.parquet/.txt file, a folder of them, or a "
        "hub dataset as org/name, org/name:split or org/name@config:split (split default: train)."
    )
    eval: float | str | None = Field(
        0.1, description="Eval data: a path, or the fraction of train held out (0 = none)."
    )
    format: DataFormat = Field(
        "auto",
        description="How rows become model inputs; auto detects it from the columns. preference: "
        "prompt/chosen/rejected (strings, or chosen/rejected conversations with an optional prompt); "
        "unpaired (KTO): prompt/completion/label, label true for a desirable answer; prompts (GRPO): "
        "prompt (text or messages) and the columns the rewards read.",
    )
    chat_template: str | None = Field(
        None,
        description="messages/sharegpt: a Jinja chat template (a string, or the path of a .jinja file) "
        "used instead of the tokenizer's own; saved with the adapter's tokenizer.",
    )
    max_length: int = Field(512, gt=0, description="Tokens per example; longer examples are truncated.")
    packing: bool = Field(False, description="Pack several short examples per row (causal_lm only).")
    train_on: Literal["completion", "all"] = Field(
        "completion", description="completion: loss on answers only (prompt masked); all: every token."
    )
    group_by_length: bool = Field(
        False,
        description="Batch examples of similar length together (seeded, shuffled batches), so "
        "padding to the longest in the batch wastes little.",
    )

    @field_validator("eval")
    @classmethod
    def _eval_fraction(cls, value: float | str | None) -> float | str | None:
        if isinstance(value, float | int) and not 0 <= value < 1:
            raise ValueError("a held-out fraction must be in [0, 1); use a path for a separate eval file")
        return _expand(value) if isinstance(value, str) else value

    @field_validator("train")
    @classmethod
    def _expand_train(cls, value: str) -> str:
        return _expand(value) or value

    @field_validator("chat_template")
    @classmethod
    def _expand_template(cls, value: str | None) -> str | None:
        return value if value is None or "{" in value else _expand(value)


class TrainingSection(_Section):
    output_dir: str | None = Field(None, description="Run folder; default runs/<name> (`~` is expanded).")
    epochs: float = Field(1, gt=0, description="Passes over the training data.")
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps; overrides epochs when set.")
    batch_size: int = Field(8, gt=0, description="Examples per micro-batch, per process.")
    grad_accum: int = Field(1, gt=0, description="Micro-batches accumulated per optimizer step.")
    lr: float = Field(2.0e-4, gt=0, description="Peak learning rate (AdamW).")
    scheduler: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Learning-rate decay after warmup."
    )
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Share of the steps spent warming up linearly.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float | None = Field(
        1.0, gt=0, description="Clip the global gradient norm; null = no clipping."
    )
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto", description="Autocast precision; auto = bf16 where the GPU supports it, else none."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward to save memory."
    )
    seed: int = Field(
        42, ge=0, le=MAX_SEED, description=f"Seed for weights init, data order and dropout (0 to {MAX_SEED})."
    )
    log_every: int = Field(10, gt=0, description="Optimizer steps between metrics.jsonl rows.")
    eval_every: int | None = Field(
        None, gt=0, description="Optimizer steps between evaluations; null = at the end only."
    )
    save_every: int | None = Field(None, gt=0, description="Optimizer steps between resumable checkpoints.")
    keep_checkpoints: int = Field(2, gt=0, description="Newest complete checkpoints kept.")
    collective_timeout: int | None = Field(
        None,
        gt=0,
        description="Seconds a process waits in one collective (a lost peer) before failing; "
        "null = torch's default (30 min on gloo, 10 min on NCCL).",
    )
    report_to: list[Literal["jsonl", "tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=lambda: ["jsonl"], description="Where metrics go (jsonl is always written)."
    )
    objective: Objective = Field(
        "sft",
        description="sft: the task's loss on the answers; dpo | orpo | simpo | kto: preference tuning on "
        "pairs (kto: unpaired answers), see `preference`; grpo: online RL on prompts, see `grpo`.",
    )

    @field_validator("output_dir")
    @classmethod
    def _expand_output_dir(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("empty; give a folder, or null for runs/<name>")
        return _expand(value)


class PreferenceSection(_Section):
    beta: float = Field(
        0.1,
        gt=0,
        description="dpo, kto: strength of the pull towards the reference (β); simpo: reward scale (β, "
        "e.g. 2.0). The implicit reward is β·(log π − log π_ref), or β·mean log π for simpo/orpo.",
    )
    loss_type: DpoLoss = Field(
        "sigmoid",
        description="dpo's loss: sigmoid (DPO), ipo (squared, per-token log-ratios), hinge (SLiC), "
        "robust (unbiased under label noise of rate label_smoothing).",
    )
    label_smoothing: float = Field(
        0.0,
        ge=0,
        lt=0.5,
        description="dpo sigmoid/robust, simpo: assumed share of pairs whose labels are flipped (ε).",
    )
    sft_weight: float = Field(
        0.0,
        ge=0,
        description="dpo, simpo: add this times the chosen answers' SFT loss (mean per token), which "
        "keeps their likelihood from falling (RPO; TRL's loss_type sft, CPO's cpo_alpha). 0 = none.",
    )
    gamma: float = Field(0.5, ge=0, description="simpo: target reward margin γ.")
    orpo_lambda: float = Field(0.1, gt=0, description="orpo: weight λ of the odds-ratio term.")
    desirable_weight: float = Field(1.0, gt=0, description="kto: weight of desirable answers' losses.")
    undesirable_weight: float = Field(1.0, gt=0, description="kto: weight of undesirable answers' losses.")


class EvalSection(_Section):
    metrics: list[Metric] | None = Field(
        None,
        description="Metrics: loss, perplexity, exact_match for causal_lm and seq2seq_lm (exact_match "
        "generates greedily and compares with the reference answer); loss, accuracy, f1 (macro) for "
        "seq_cls. null = the task's default: [loss, perplexity], or [loss, accuracy, f1] for seq_cls.",
    )
    max_new_tokens: int = Field(32, gt=0, description="Generation budget for exact_match.")

    @field_validator("metrics")
    @classmethod
    def _some_metric(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not value:
            raise ValueError(
                "list at least one metric (null = the task's default); data.eval: 0 skips evaluation"
            )
        return value


class Recipe(_Section):
    name: str = Field(
        "run",
        description=f"Run name, default the recipe file's name; the default output folder is runs/<name>. "
        f"One folder name: {NAME_RULE}.",
    )
    model: ModelSection
    peft: PeftSection
    data: DataSection
    training: TrainingSection = Field(default_factory=TrainingSection)
    preference: PreferenceSection = Field(default_factory=PreferenceSection)
    grpo: GrpoSection = Field(default_factory=GrpoSection)
    eval: EvalSection = Field(default_factory=EvalSection)

    @field_validator("name")
    @classmethod
    def _one_folder_name(cls, value: str) -> str:
        if not NAME.fullmatch(value):
            raise ValueError(
                f"a run name is one folder name: {NAME_RULE} (for another folder, set training.output_dir)"
            )
        return value

    @model_validator(mode="after")
    def _cross_checks(self) -> Recipe:
        if implied := METHODS[self.peft.method].implies_quantization:
            have = self.model.quantization
            if have not in ("none", implied):
                raise ValueError(
                    f"peft.method: {self.peft.method} trains on a {implied.removesuffix('bit')}-bit base but "
                    f"model.quantization is {have}; set model.quantization: {implied}, "
                    f"or use peft.method: lora with {have}"
                )
            if have == "none":
                self.model.quantization = implied
        from peftcli.methods.init_table import recipe_problem

        if problem := recipe_problem(self.peft, self.model.quantization):
            raise ValueError(problem)
        if self.data.train_on == "all" and self.model.task != "causal_lm":
            raise ValueError(
                f"data.train_on: all applies to causal_lm; {self.model.task} always trains on its targets"
            )
        if self.data.packing and self.model.task != "causal_lm":
            raise ValueError(f"data.packing works for causal_lm only, not model.task: {self.model.task}")
        objective = self.training.objective
        data = self.data
        if problem := objective_problem(objective, self.model.task, data.packing, data.train_on, data.format):
            raise ValueError(problem)
        if OBJECTIVES[objective].generates and not self.grpo.rewards:
            raise ValueError(f"training.objective: {objective} needs grpo.rewards (at least one reward)")
        task, fits = self.model.task, TASKS[self.model.task].metrics
        defaults = TASKS[task].default_metrics
        what = f"model.task: {task}"
        if not OBJECTIVES[objective].task_loss:
            fits = defaults = OBJECTIVES[objective].metrics
            what = f"training.objective: {objective}"
        if self.eval.metrics is None:
            self.eval.metrics = list(defaults)
        unfit = [m for m in self.eval.metrics if m not in fits]
        if unfit:
            raise ValueError(
                f"eval.metrics: {', '.join(unfit)} {'does' if len(unfit) == 1 else 'do'} not apply to "
                f"{what}; it computes {', '.join(fits)}"
            )
        return self

    @property
    def output_dir(self) -> Path:
        return Path(self.training.output_dir or os.path.join("runs", self.name))
