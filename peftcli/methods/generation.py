"""Generation that samples the model as trained, for every method.

HF `generate` serves the methods that change weights. It does not serve prompt learning with
transformers 5.25 and PEFT 0.21: prefix tuning's prefixes, which PEFT hands over as
`past_key_values`, are replaced by generate's own cache (it samples the base model), and prompt
and p-tuning place every token after the first at other positions than the forward pass that
trained them. For those, `generate` decodes here without a cache: each new token is the forward
pass training used, on the whole sequence so far (quadratic in the answer's length; these
methods run on the prompts and answers a recipe trains on). Prompts are decoded in groups of
equal length, so no row is padded and every row sees the positions it trained with.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch


def active_prompt_learning(model: Any) -> str | None:
    """The PEFT type of `model`'s active prompt-learning adapter (PROMPT_TUNING, P_TUNING,
    PREFIX_TUNING); None for any other method, no adapter, or an adapter disabled."""
    peft = model.module if hasattr(model, "module") else model
    config = getattr(peft, "peft_config", {}).get(getattr(peft, "active_adapter", None))
    if config is None or not config.is_prompt_learning or getattr(peft, "_adapters_disabled", False):
        return None
    return getattr(config.peft_type, "value", config.peft_type)  # PEFT's PeftType is a str enum


def trained_forward_only(model: Any) -> bool:
    """Whether HF `generate` would sample something else than the model's forward pass."""
    return active_prompt_learning(model) is not None


def generate(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    pad_token_id: int,
    eos_token_id: int | list[int] | None = None,
    logits_processor: Any = None,
    do_sample: bool = False,
    model_inputs: dict[str, Any] | None = None,
    **sampling: Any,
) -> torch.Tensor:
    """HF `generate`'s result (decoder-only: prompt + continuation; encoder-decoder: the decoder's
    ids) for every method. `model_inputs`: the model's other inputs (a vision-language model's
    `pixel_values`); `sampling`: temperature/top_p/top_k as `generate` takes them."""
    if not trained_forward_only(model):
        extra = {"eos_token_id": eos_token_id} if eos_token_id is not None else {}
        return model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad_token_id,
            logits_processor=logits_processor,
            do_sample=do_sample,
            **extra,
            **(model_inputs or {}),
            **sampling,
        )
    if model_inputs:  # refused at validate: prompt learning is not offered for vision-language models
        raise NotImplementedError("prompt learning's generation takes token ids only")
    peft = model.module if hasattr(model, "module") else model
    stops = eos_token_id if eos_token_id is not None else peft.generation_config.eos_token_id
    stops = [] if stops is None else [stops] if isinstance(stops, int) else list(stops)
    processors = list(logits_processor or [])
    if do_sample:
        processors = _warpers(sampling) + processors
    lengths = attention_mask.sum(1).tolist()
    groups: dict[int, list[int]] = defaultdict(list)
    for row, n in enumerate(lengths):
        groups[int(n)].append(row)
    encoder_decoder = getattr(peft.config, "is_encoder_decoder", False)
    new: dict[int, torch.Tensor] = {}
    for n, rows in groups.items():
        prompts = input_ids[rows] if encoder_decoder else input_ids[rows][:, input_ids.shape[1] - n :]
        mask = attention_mask[rows] if encoder_decoder else None
        # A processor that keeps state per row (sampling.GumbelNoise) gives the group its rows'.
        mine = [p.select(rows) if hasattr(p, "select") else p for p in processors]
        tokens = _decode(peft, prompts, mask, max_new_tokens, mine, do_sample, stops, pad_token_id)
        new.update(zip(rows, tokens, strict=True))
    out = torch.full((len(lengths), max(len(t) for t in new.values())), pad_token_id, dtype=input_ids.dtype)
    for row, tokens in new.items():
        out[row, : len(tokens)] = tokens
    out = out.to(input_ids.device)
    if encoder_decoder:  # generate's decoder ids begin with the decoder's start token
        start = torch.full(
            (len(out), 1), peft.config.decoder_start_token_id, dtype=out.dtype, device=out.device
        )
        return torch.cat([start, out], dim=1)
    return torch.cat([input_ids, out], dim=1)


def _warpers(sampling: dict[str, Any]) -> list[Any]:
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    warpers: list[Any] = []
    if (t := sampling.get("temperature")) not in (None, 1.0):
        warpers.append(TemperatureLogitsWarper(t))
    if (k := sampling.get("top_k")) not in (None, 0):
        warpers.append(TopKLogitsWarper(k))
    if (p := sampling.get("top_p")) not in (None, 1.0):
        warpers.append(TopPLogitsWarper(p))
    return warpers


@torch.no_grad()
def _decode(
    peft: Any,
    prompts: torch.Tensor,
    encoder_mask: torch.Tensor | None,
    max_new_tokens: int,
    processors: list[Any],
    do_sample: bool,
    stops: list[int],
    pad: int,
) -> torch.Tensor:
    """The new tokens [rows, ≤ max_new_tokens] after equal-length prompts, one whole forward pass
    per token; a row that has stopped continues with padding, as in `generate`."""
    encoder_decoder = encoder_mask is not None
    start = peft.config.decoder_start_token_id if encoder_decoder else None
    seq = (
        torch.full((len(prompts), 1), start, dtype=prompts.dtype, device=prompts.device)
        if encoder_decoder
        else prompts
    )
    done = torch.zeros(len(prompts), dtype=torch.bool, device=prompts.device)
    stop_ids = torch.tensor(stops, dtype=prompts.dtype, device=prompts.device)
    for _ in range(max_new_tokens):
        if encoder_decoder:
            logits = peft(input_ids=prompts, attention_mask=encoder_mask, decoder_input_ids=seq).logits[:, -1]
        else:
            logits = peft(input_ids=seq, attention_mask=torch.ones_like(seq)).logits[:, -1]
        scores = logits.float()
        for p in processors:
            scores = p(seq, scores)
        if do_sample:
            token = torch.multinomial(torch.softmax(scores.float(), -1), 1).squeeze(1)
        else:
            token = scores.argmax(-1)
        token = torch.where(done, torch.full_like(token, pad), token)
        seq = torch.cat([seq, token[:, None]], dim=1)
        done |= torch.isin(token, stop_ids)
        if bool(done.all()):
            break
    return seq[:, 1:] if encoder_decoder else seq[:, prompts.shape[1] :]
