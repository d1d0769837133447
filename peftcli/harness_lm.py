"""lm-eval's `hf` model (HFLM) on a run's model, scoring every method as it trained.

For the methods that change weights it is HFLM itself. Two things change while a
prompt-learning adapter (prompt tuning, p-tuning, prefix tuning) is active:

- generate_until tasks decode through peftcli's `methods.generation.generate`: HF `generate`
  does not sample these adapters as trained (transformers 5.25, PEFT 0.21; that module says why),
  so lm-eval's own `hf` model gives other answers for them;
- the longest input lm-eval builds is the model's less the virtual tokens, which take positions
  too (GPT-2's learned positions would otherwise be indexed past their table).

Log-likelihoods are lm-eval's own computation: lm-eval 0.4.13 already drops the logits of
prompt and p-tuning's virtual tokens (`inplen + (logits.shape[0] - padding_len_inp)` in
`HFLM._loglikelihood_tokens`), and prefix tuning returns none (tested).

Imported only when lm-eval (the `harness` extra) is installed.
"""

from __future__ import annotations

from typing import Any

from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import normalize_gen_kwargs

from peftcli.errors import UserError
from peftcli.methods.generation import active_prompt_learning, generate, trained_forward_only

# lm-eval's generation kwargs (beyond the attention mask) that peftcli's decoding takes, as HF
# generate takes them; num_beams=1 (plain greedy or sampling) is accepted too.
SAMPLING = ("temperature", "top_p", "top_k")


class TrainedLM(HFLM):
    """HFLM, with prompt-learning adapters decoded and bounded as they trained."""

    @property
    def max_length(self) -> int:
        return super().max_length - virtual_tokens(self.model)

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        if trained_forward_only(self.model):  # refused before lm-eval's progress bar starts
            for request in requests:
                kwargs = normalize_gen_kwargs(request.args[1], self.max_gen_toks)
                refuse_unsupported(self.model, kwargs)
        return super().generate_until(requests, disable_tqdm)

    def _model_generate(self, context: Any, max_length: int, stop: list[str], **kwargs: Any) -> Any:
        if not trained_forward_only(self.model):
            return super()._model_generate(context, max_length, stop, **kwargs)
        return generate_as_trained(self, context, max_length, stop, kwargs)


def virtual_tokens(model: Any) -> int:
    """The positions the active prompt-learning adapter takes before the input (0 without one)."""
    if active_prompt_learning(model) is None:
        return 0
    return model.peft_config[model.active_adapter].num_virtual_tokens


def hf_model_caveat(model: Any) -> str | None:
    """What lm-eval's own `hf` model (eval.json's model_args) does differently for this model's
    method; None where it scores the model as peftcli does."""
    kind = active_prompt_learning(model)
    if kind is None:
        return None
    return (
        f"lm-eval's own hf model (these model_args) scores log-likelihood tasks the same, but decodes "
        f"generate_until tasks with HF generate, which does not sample {kind} adapters as trained "
        f"(peftcli decodes by whole forward passes), and lets the {virtual_tokens(model)} virtual "
        "tokens push the longest inputs past the model's positions"
    )


def generate_as_trained(lm: HFLM, context: Any, max_length: int, stop: list[str], kwargs: dict) -> Any:
    """HFLM._model_generate's result (left-padded prompts + answers, `max_length` in all),
    decoded by peftcli's whole forward passes."""
    mask = kwargs.pop("attention_mask")
    do_sample = kwargs.pop("do_sample", None)  # the rest: SAMPLING only, refused otherwise in generate_until
    config = lm.model.generation_config  # what HF generate uses where the task says nothing
    eos = config.eos_token_id if config.eos_token_id is not None else lm.tokenizer.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if do_sample is None:  # as HFLM: no temperature means greedy, else HF generate's default
        do_sample = kwargs.get("temperature", 0.0) != 0.0 and bool(config.do_sample)
    seq2seq = lm.backend == "seq2seq"
    starts = [1] * len(context) if seq2seq else mask.sum(1).tolist()  # where each answer begins
    return generate(
        lm.model,
        context,
        mask,
        max_new_tokens=max_length - (1 if seq2seq else context.shape[1]),  # seq2seq: the start token
        pad_token_id=lm.tokenizer.pad_token_id,
        eos_token_id=eos,
        logits_processor=[StopAfter(lm.tokenizer, stop, eos[0], starts)] if stop and eos else None,
        do_sample=bool(do_sample),
        **{k: kwargs.get(k, getattr(config, k, None)) for k in SAMPLING},
    )


def refuse_unsupported(model: Any, kwargs: dict) -> None:
    """One line for a task's generation setting that peftcli's decoding does not do (beam search,
    ...); `kwargs`: the task's generation_kwargs as lm-eval normalises them."""
    other = sorted(set(kwargs) - {"until", "max_gen_toks", "do_sample", "num_beams", *SAMPLING})
    if other or kwargs.get("num_beams", 1) != 1:
        raise UserError(
            f"--harness: the task asks generation for {', '.join(other or ['num_beams'])}, which "
            f"peftcli's decoding of {active_prompt_learning(model)} adapters does not do "
            "(greedy or sampling with temperature, top_p, top_k)"
        )


class StopAfter:
    """Ends a row (its next token the end token) once its answer holds a stop sequence: lm-eval
    cuts the text at the first one anyway, so the tokens after it would be thrown away."""

    def __init__(self, tokenizer: Any, stop: list[str], eos: int, starts: list[int]) -> None:
        self.tokenizer, self.stop, self.eos, self.starts = tokenizer, stop, eos, starts

    def select(self, rows: list[int]) -> StopAfter:
        """The processor of `generate`'s group of `rows` (prompts of one length)."""
        return StopAfter(self.tokenizer, self.stop, self.eos, [self.starts[r] for r in rows])

    def __call__(self, seq: Any, scores: Any) -> Any:
        for row, start in enumerate(self.starts):
            text = self.tokenizer.decode(seq[row, start:], skip_special_tokens=True)
            if any(s in text for s in self.stop):
                scores = scores.clone()
                scores[row] = float("-inf")
                scores[row, self.eos] = 0.0
        return scores
