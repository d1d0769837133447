"""GRPO's sampling, keyed per completion: what a completion samples depends only on the run's
seed, the step, its prompt's row in the data and which of the group's answers it is — never on
the process, the micro-batch or what else shares its batch. So 2 processes sample what 1 does,
and a resumed run samples what an uninterrupted one would.

HF `generate` runs greedy (do_sample=False) through three logits processors: transformers'
own temperature and top-p warpers (what `do_sample=True` would apply), then Gumbel noise drawn
per row from that row's own generator. The argmax of logits + Gumbel(0, 1) noise is a sample of
softmax(logits) (the Gumbel-max trick: P(argmax = i) = p_i exactly), so this samples the same
distribution as `do_sample=True`, with one random stream per completion instead of one per batch.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch


def key_seed(*parts: object) -> int:
    """A 63-bit seed from the parts of a key (seed, step, row, generation)."""
    text = "/".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


class GumbelNoise:
    """A logits processor: adds Gumbel(0, 1) noise to each row, drawn from that row's generator
    (one vocabulary-sized draw per generated token), in float64."""

    def __init__(self, seeds: list[int], device: torch.device):
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]

    def select(self, rows: list[int]) -> GumbelNoise:
        """The processor of some of the rows (peftcli's own decoding runs rows in groups): their
        generators, not copies, so each row's stream goes on where it stands."""
        picked = object.__new__(GumbelNoise)
        picked.generators = [self.generators[i] for i in rows]
        return picked

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        n, vocab = scores.shape
        assert n == len(self.generators), "one generator per row"
        tiny = torch.finfo(torch.float64).tiny
        u = torch.stack(
            [
                torch.rand(vocab, generator=g, device=scores.device, dtype=torch.float64)
                for g in self.generators
            ]
        )
        return scores.double() - torch.log(-torch.log(u.clamp(min=tiny)))


def sampling_processors(seeds: list[int], temperature: float, top_p: float, device: torch.device) -> Any:
    """The processors that make greedy decoding sample softmax(top_p(logits / temperature)),
    row i from seed `seeds[i]`."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

    warpers: list[Any] = [] if temperature == 1.0 else [TemperatureLogitsWarper(temperature)]
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    return LogitsProcessorList([*warpers, GumbelNoise(seeds, device)])
