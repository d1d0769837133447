"""What peftcli knows about each `model.task`, in one table: the transformers class that loads
it, PEFT's task type, the data formats it trains on, what evaluation computes for it.

Imports nothing heavy: the recipe schema, `validate` and the data checks read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

Task = Literal["causal_lm", "seq2seq_lm", "seq_cls", "image_text_to_text"]

# The label of a token (or, for classification, an example) that carries no loss, in every task:
# Hugging Face's convention, which PyTorch's cross-entropy ignores.
IGNORE = -100


@dataclass(frozen=True)
class TaskSpec:
    name: str
    auto_class: str  # transformers' AutoModelFor* class
    auto_mapping: str  # transformers.models.auto.modeling_auto: model type -> task class name
    peft_task_type: str  # PEFT's TaskType
    formats: tuple[str, ...]  # data formats, in the order `data.format: auto` tries them
    metrics: tuple[str, ...]  # what evaluation computes
    default_metrics: tuple[str, ...]  # what it reports when eval.metrics is null
    pipeline_tag: str = "text-generation"  # the Hub's pipeline_tag, in a model card
    next_token: bool = False  # a decoder's labels: position t predicts token t+1
    vision: bool = False  # images in its data: a processor beside the tokenizer


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in [
        TaskSpec(
            "causal_lm",
            "AutoModelForCausalLM",
            "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
            "CAUSAL_LM",
            ("messages", "sharegpt", "alpaca", "completion", "text"),
            ("loss", "perplexity", "exact_match"),
            ("loss", "perplexity"),
            next_token=True,
        ),
        TaskSpec(
            "seq2seq_lm",
            "AutoModelForSeq2SeqLM",
            "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
            "SEQ_2_SEQ_LM",
            ("completion", "alpaca"),
            ("loss", "perplexity", "exact_match"),
            ("loss", "perplexity"),
            "text2text-generation",
        ),
        TaskSpec(
            "seq_cls",
            "AutoModelForSequenceClassification",
            "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
            "SEQ_CLS",
            ("classification",),
            ("loss", "accuracy", "f1"),
            ("loss", "accuracy", "f1"),
            "text-classification",
        ),
        # A vision-language model (LLaVA, Qwen2-VL, Idefics3, ...): a decoder over text and image
        # tokens, trained on image+text messages; PEFT wraps it as a causal LM.
        TaskSpec(
            "image_text_to_text",
            "AutoModelForImageTextToText",
            "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",
            "CAUSAL_LM",
            ("messages",),
            ("loss", "perplexity", "exact_match"),
            ("loss", "perplexity"),
            "image-text-to-text",
            next_token=True,
            vision=True,
        ),
    ]
}
assert tuple(TASKS) == get_args(Task)


def task_of_peft_type(task_type: str | None) -> str:
    """The task of a saved adapter, from its adapter_config.json `task_type` (default causal LM)."""
    return next((t.name for t in TASKS.values() if t.peft_task_type == task_type), "causal_lm")


# Model types without a decoder: they classify (seq_cls), never generate (causal_lm).
ENCODER_ONLY = {
    "bert",
    "roberta",
    "deberta",
    "deberta-v2",
    "distilbert",
    "electra",
    "albert",
    "xlm-roberta",
    "modernbert",
}
