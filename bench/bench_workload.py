"""The benchmark's shared work: a tokenizer, a random-init Llama of a chosen shape, mixed-length
prompt/completion data, and the FLOP count used for MFU. Every trainer gets exactly these.

Nothing here downloads anything: the tokenizer is a byte-level BPE trained on the generated
text, the model is written from a config with seed 0, the data is drawn from a seeded
generator.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

SPECIALS = ["<s>", "</s>", "<pad>"]
TOPICS = 8
PROMPT_HEAD = "### Topic {topic}\n"
PROMPT_TAIL = "\n### Response:\n"


@dataclass(frozen=True)
class Shape:
    """A Llama shape (RoPE, SwiGLU, RMSNorm); `kv_heads` < `heads` is grouped-query attention."""

    hidden: int = 512
    layers: int = 8
    heads: int = 8
    kv_heads: int = 8
    intermediate: int = 1408
    vocab: int = 8192  # the model's embedding rows; at least the tokenizer's vocabulary
    tie_embeddings: bool = False

    @property
    def name(self) -> str:
        return f"llama-h{self.hidden}-l{self.layers}-v{self.vocab}"


# Llama-3.2-1B's shape (random init here): the GPU variant's model.
LLAMA_1B = Shape(
    hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=128256, tie_embeddings=True
)
LLAMA_8B = Shape(hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336, vocab=128256)


def width_shape(hidden: int, base: Shape = Shape()) -> Shape:
    """`base` at another width: 64-wide heads, the FFN ~2.75x wide (a multiple of 64)."""
    heads = max(1, hidden // 64)
    return Shape(
        hidden=hidden,
        layers=base.layers,
        heads=heads,
        kv_heads=heads,
        intermediate=64 * round(2.75 * hidden / 64),
        vocab=base.vocab,
        tie_embeddings=base.tie_embeddings,
    )


# --------------------------------------------------------------------------- counting


def linear_params(shape: Shape) -> int:
    """Weights of the matmuls a token goes through: attention, MLP, and the LM head."""
    head_dim = shape.hidden // shape.heads
    attn = 2 * shape.hidden * shape.hidden + 2 * shape.hidden * shape.kv_heads * head_dim
    mlp = 3 * shape.hidden * shape.intermediate
    return shape.layers * (attn + mlp) + shape.hidden * shape.vocab


def total_params(shape: Shape) -> int:
    embed = shape.vocab * shape.hidden
    norms = (2 * shape.layers + 1) * shape.hidden
    head = 0 if shape.tie_embeddings else shape.vocab * shape.hidden
    return linear_params(shape) - shape.hidden * shape.vocab + embed + head + norms


def lora_params(shape: Shape, r: int) -> int:
    """LoRA on every linear layer of the blocks (`all-linear`: not the LM head): r x (in + out) each."""
    kv = shape.kv_heads * (shape.hidden // shape.heads)
    per_layer = (
        2 * r * (shape.hidden + shape.hidden)  # q, o
        + 2 * r * (shape.hidden + kv)  # k, v
        + 3 * r * (shape.hidden + shape.intermediate)  # gate, up, down
    )
    return shape.layers * per_layer


FLOPS_FORMULA = (
    "FLOPs per real (non-padding) token = 2·N (forward through the frozen linears, LM head included) "
    "+ 2·N (backward: activation gradients only, frozen weights get none) + 6·n (the adapter's own "
    "forward, activation-gradient and weight-gradient matmuls) = 4·N + 6·n; embedding lookups and "
    "attention scores are not counted, padding and recomputation are not useful work"
)


def flops_per_token(shape: Shape, r: int) -> int:
    """See FLOPS_FORMULA: N = frozen linear weights, n = LoRA weights."""
    return 4 * linear_params(shape) + 6 * lora_params(shape, r)


# --------------------------------------------------------------------------- text


def lexicon(size: int = 6000, seed: int = 0) -> list[str]:
    """Pronounceable made-up words of 1-4 syllables, unique, in Zipf rank order."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + ["an", "el", "or", "is", "um"]
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < size:
        word = "".join(rng.choice(syllables) for _ in range(rng.choice((1, 2, 2, 3, 3, 4))))
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


def zipf_weights(n: int, exponent: float = 1.07) -> list[float]:
    return [1.0 / (rank + 2.7) ** exponent for rank in range(n)]


class Text:
    """Zipf-distributed words; each topic draws its answers from its own permutation of the
    lexicon, so an adapter has something to learn (which topic favours which words)."""

    def __init__(self, seed: int = 0):
        self.words = lexicon(seed=seed)
        self.cum = _cumulative(zipf_weights(len(self.words)))
        self.topic_words = []
        for topic in range(TOPICS):
            order = self.words[:]
            random.Random(1000 + topic).shuffle(order)
            self.topic_words.append(order)

    def draw(self, rng: random.Random, topic: int | None = None) -> str:
        words = self.words if topic is None else self.topic_words[topic]
        return words[_bisect(self.cum, rng.random() * self.cum[-1])]


def _cumulative(weights: list[float]) -> list[float]:
    out, total = [], 0.0
    for w in weights:
        total += w
        out.append(total)
    return out


def _bisect(cum: list[float], x: float) -> int:
    lo, hi = 0, len(cum) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if cum[mid] < x:
            lo = mid + 1
        else:
            hi = mid
    return lo


# --------------------------------------------------------------------------- tokenizer


def build_tokenizer(folder: Path, vocab: int = 8192, seed: int = 0) -> Any:
    """A byte-level BPE (GPT-2 style, no BOS added) trained on the generated text; saved to `folder`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if (folder / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(folder)
    text, rng = Text(seed), random.Random(seed + 1)
    corpus = [
        " ".join(text.draw(rng, rng.randrange(TOPICS) if i % 2 else None) for _ in range(64))
        for i in range(3000)
    ]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus + [PROMPT_HEAD + PROMPT_TAIL] * 50, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", model_max_length=4096
    )
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(folder)
    return fast


# --------------------------------------------------------------------------- model


def build_model(
    folder: Path, shape: Shape, tokenizer_dir: Path, device: str = "cpu", dtype: str = "float32"
) -> Path:
    """A random-init Llama of `shape` (seed 0), saved as an ordinary HF folder with the tokenizer."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert len(tokenizer) <= shape.vocab, "the model must have a row for every token"
    config = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=shape.tie_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        # std 1/sqrt(width), as peftcli's builtin models: a frozen random model's logits are then
        # large enough (std ~1) for an adapter to move the loss; with 0.02 it sits at ln(vocab).
        initializer_range=shape.hidden**-0.5,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    return folder


# --------------------------------------------------------------------------- data


@dataclass
class DataSpec:
    """Prompt+completion lengths (tokens, EOS included) drawn log-normal around `median`,
    clipped to [min_len, max_len]: many short examples, a long tail. `fixed` gives every
    example exactly that length instead (the sequence-length scaling runs)."""

    examples: int = 256
    median: float = 100.0
    sigma: float = 0.8
    min_len: int = 16
    max_len: int = 512
    fixed: int | None = None
    seed: int = 0


def write_data(path: Path, spec: DataSpec, tokenizer: Any) -> dict[str, Any]:
    """Write prompt/completion JSON lines following `spec`; returns their token-length statistics
    (measured with `tokenizer`, EOS counted)."""
    text, rng = Text(), random.Random(spec.seed)
    cost = _word_costs(text, tokenizer)
    head = len(tokenizer(PROMPT_HEAD.format(topic=0), add_special_tokens=False)["input_ids"])
    tail = len(tokenizer(PROMPT_TAIL, add_special_tokens=False)["input_ids"])
    rows = []
    for _ in range(spec.examples):
        if spec.fixed:
            total = spec.fixed
        else:
            total = round(math.exp(rng.gauss(math.log(spec.median), spec.sigma)))
            # A few tokens of slack: word boundaries can add one or two.
            total = min(max(total, spec.min_len), spec.max_len - 4)
        prompt_share = rng.uniform(0.3, 0.8)
        answer_budget = max(2, round(total * (1 - prompt_share)) - 1)  # - EOS
        prompt_budget = max(1, total - 1 - answer_budget - head - tail)
        topic = rng.randrange(TOPICS)
        prompt_words = _words(text, rng, cost, prompt_budget, None)
        answer_words = _words(text, rng, cost, answer_budget, topic)
        rows.append(
            {
                "prompt": PROMPT_HEAD.format(topic=topic) + " ".join(prompt_words) + PROMPT_TAIL,
                "completion": " ".join(answer_words),
            }
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return length_stats(rows, tokenizer)


def _word_costs(text: Text, tokenizer: Any) -> dict[str, int]:
    words = text.words
    ids = tokenizer([" " + w for w in words], add_special_tokens=False)["input_ids"]
    return {w: len(i) for w, i in zip(words, ids, strict=True)}


def _words(text: Text, rng: random.Random, cost: dict[str, int], budget: int, topic: int | None) -> list[str]:
    out, used = [], 0
    while used < budget:
        word = text.draw(rng, topic)
        if used + cost[word] > budget and out:
            word = next((w for w in text.words[:64] if cost[w] <= budget - used), None)
            if word is None:
                break
        out.append(word)
        used += cost[word]
    return out


def length_stats(rows: list[dict[str, str]], tokenizer: Any) -> dict[str, Any]:
    prompts = tokenizer([r["prompt"] for r in rows], add_special_tokens=False)["input_ids"]
    answers = tokenizer([r["completion"] for r in rows], add_special_tokens=False)["input_ids"]
    totals = sorted(len(p) + len(a) + 1 for p, a in zip(prompts, answers, strict=True))
    supervised = sum(len(a) + 1 for a in answers)
    n = len(totals)
    return {
        "examples": n,
        "tokens": sum(totals),
        "supervised_tokens": supervised,
        "min": totals[0],
        "median": totals[n // 2],
        "mean": round(sum(totals) / n, 1),
        "p90": totals[min(n - 1, int(0.9 * n))],
        "max": totals[-1],
    }


def shape_dict(shape: Shape) -> dict[str, Any]:
    return {
        **asdict(shape),
        "name": shape.name,
        "params": total_params(shape),
        "linear_params": linear_params(shape),
    }
