"""GRPO: online RL with rewards (Shao et al., 2024), on the one objective interface.

Per optimizer step `begin_step` samples `num_generations` completions of each prompt of the
step's micro-batches with HF `generate` (each completion from its own random stream, keyed by the
run's seed, the step, the prompt's data row and its place in the group: sampling.py; so a resumed
run, and any number of processes, sample what one uninterrupted process would), scores them with the
recipe's rewards, and turns each prompt's group into advantages: (reward − the group's mean),
divided by the group's (or the batch's) std. A group never spans processes (each process samples
whole groups for its own prompts), so its statistics are exact with any number of processes;
`scale_rewards: batch` sums over all processes in one all-reduce.

The loss is TRL's GRPOTrainer's (token-level importance ratio, clipped to [1-ε, 1+ε], plus
β times the k3 estimate of KL(π‖π_ref)). Each generation batch is trained on once (TRL's
num_iterations = 1), so the ratio is 1 in value and only its gradient acts. The reference is
what the policy starts from: the base (the adapter disabled), or with `peft.init_from` the
starting adapter's weights, swapped in for the reference's forward pass — no second copy of the
model either way (reference.as_reference).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from peftcli.methods.generation import active_prompt_learning, generate
from peftcli.objectives.base import Batch, Objective, Step
from peftcli.objectives.reference import as_reference, starting_weights
from peftcli.objectives.rewards import Rewards
from peftcli.objectives.sampling import key_seed, sampling_processors


def grpo_token_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    beta: float,
    epsilon: float,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Per-token loss [n, T], per-token KL (None when β = 0), and which tokens were clipped."""
    ratio = torch.exp(logps - old_logps)
    clipped_ratio = torch.clamp(ratio, 1 - epsilon, 1 + epsilon)
    a = advantages.unsqueeze(1)
    per_token = -torch.min(ratio * a, clipped_ratio * a)
    clipped = (ratio * a) > (clipped_ratio * a)
    kl = None
    if beta != 0.0:
        kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1  # type: ignore[operator]
        per_token = per_token + beta * kl
    return per_token, kl, clipped


def normalised(
    per_token: torch.Tensor, mask: torch.Tensor, loss_type: str, totals: dict[str, Any], max_new_tokens: int
) -> torch.Tensor:
    """A micro-batch's share of the global batch's loss (see GrpoSection.loss_type): divided by
    what the whole global batch holds, so accumulation and processes give one big batch's loss."""
    if loss_type == "grpo":  # each completion's mean over its tokens, then the mean over completions
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).sum() / totals["completions"]
    if loss_type == "dr_grpo":  # a constant length: no bias towards short or long answers
        return (per_token * mask).sum() / (totals["completions"] * max_new_tokens)
    return (per_token * mask).sum() / totals["tokens"]  # dapo: every token of the batch alike


def completion_logits(model: Any, batch: Batch, temperature: float) -> torch.Tensor:
    """Logits [n, T, vocab] (float32, divided by the temperature) that predict the completion tokens.

    Prompts are left-padded: positions count from each row's first real token, as `generate`
    counts them (a model with absolute positions, GPT-2, would otherwise score every padded
    row at the wrong places: up to 4 nats off on builtin:tiny-gpt2, tested). Prompt and
    p-tuning take no position ids (PEFT drops them, with a warning) and put their virtual tokens
    before the row, so a row's pads would stand between those and its prompt: each row is moved
    to the left, its pads to the end, and is scored where it stands unpadded (tested)."""
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    n, length, t = ids.shape[0], ids.shape[1], batch["completion_ids"].shape[1]
    kind = active_prompt_learning(model)
    if kind in ("PROMPT_TUNING", "P_TUNING"):
        pads = (batch["prompt_mask"] == 0).sum(1, keepdim=True)
        moved = (torch.arange(length, device=ids.device) + pads) % length  # row r's pads last
        logits = model(input_ids=ids.gather(1, moved), attention_mask=mask.gather(1, moved)).logits
        # Token j of the row now stands at j - pads; the logits hold the virtual tokens' first.
        at = logits.shape[1] - length + torch.arange(length - t - 1, length - 1, device=ids.device) - pads
        return logits[torch.arange(n, device=ids.device)[:, None], at].float() / temperature
    takes_positions = kind in (None, "PREFIX_TUNING")  # None: no adapter active (the base's)
    positions = {"position_ids": (mask.cumsum(1) - 1).clamp(min=0)} if takes_positions else {}
    return (
        model(input_ids=ids, attention_mask=mask, **positions).logits[:, -t - 1 : -1, :].float() / temperature
    )


def token_logps(model: Any, batch: Batch, temperature: float) -> torch.Tensor:
    """Log-probabilities [n, T] of the completion tokens (logits / temperature, as TRL)."""
    logits = completion_logits(model, batch, temperature)
    return torch.gather(logits.log_softmax(-1), 2, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)


class GRPO(Objective):
    counted = "completions"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.section, self.rewards = self.grpo, Rewards(self.grpo.rewards)
        # load_stages (and eval) seed torch with training.seed before they build the objective.
        self.seed = torch.initial_seed()
        self.start_weights: dict[str, torch.Tensor] | None = None
        self.sums = (
            "loss", "steps", "completions", "completion_tokens", "kl", "clipped", "reward", "reward_std", "groups",
        ) + tuple(f"reward_{n}" for n in self.rewards.names)  # fmt: skip

    def collate(self, examples: list[dict[str, Any]], multiple: int = 1, limit: int | None = None) -> Batch:
        """Prompts, left-padded for generation, with their text and the rows' other columns."""
        longest = max(len(e["input_ids"]) for e in examples)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(examples), longest), pad, dtype=torch.long)
        mask = torch.zeros((len(examples), longest), dtype=torch.long)
        for row, e in enumerate(examples):
            ids[row, longest - len(e["input_ids"]) :] = torch.tensor(e["input_ids"])
            mask[row, longest - len(e["input_ids"]) :] = 1
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "num_tokens": mask.sum(),
            "prompts": [e["prompt"] for e in examples],  # type: ignore[dict-item]
            "columns": [e["columns"] for e in examples],  # type: ignore[dict-item]
            "rows": [e["row"] for e in examples],  # type: ignore[dict-item]
        }

    def sample(self, model: Any, prompts: Batch, generations: int, key: tuple | None) -> Batch:
        """`generations` completions of each prompt, scored: a micro-batch to train on. Completion
        k of the prompt of data row r samples from its own stream, seeded by (*key, r, k); no
        `key`: greedy."""
        peft = model.module if hasattr(model, "module") else model
        s, device = self.section, prompts["input_ids"].device
        ids = prompts["input_ids"].repeat_interleave(generations, 0)
        mask = prompts["attention_mask"].repeat_interleave(generations, 0)
        processors = None
        if key is not None:
            seeds = [key_seed(*key, r, k) for r in prompts["rows"] for k in range(generations)]
            processors = sampling_processors(seeds, s.temperature, s.top_p, device)
        was_training = peft.training
        peft.eval()
        # methods/generation.generate: HF generate, except for prompt learning, which it decodes
        # by whole forward passes on unpadded rows, as training scores them (completion_logits).
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        with torch.no_grad():
            out = generate(
                peft, ids, mask, s.max_new_tokens, pad, eos_token_id=eos, logits_processor=processors
            )
        peft.train(was_training)
        completion = out[:, ids.shape[1] :]
        # A completion ends at its first EOS (kept: the model learns to stop); the rest is padding.
        is_eos = completion == self.tokenizer.eos_token_id
        ends = torch.where(is_eos.any(1), is_eos.int().argmax(1), completion.shape[1])
        keep = torch.arange(completion.shape[1], device=device).unsqueeze(0) <= ends.unsqueeze(1)
        real = torch.ones(len(ids), dtype=torch.float64, device=device)
        if "repeat" in prompts:  # a prompt Accelerate repeats to even out the epoch: no tokens, no sums
            real = (~prompts["repeat"]).repeat_interleave(generations).double()
        texts = [
            self.tokenizer.decode(c[: int(k.sum())], skip_special_tokens=True)
            for c, k in zip(completion, keep, strict=True)
        ]
        repeat = lambda xs: [x for x in xs for _ in range(generations)]  # noqa: E731
        scores = self.rewards.score(
            repeat(prompts["prompts"]), texts, repeat(prompts["columns"]), repeat(prompts["rows"])
        )
        per_func = torch.tensor(scores, dtype=torch.float64, device=device).reshape(len(texts), -1)
        weights = torch.tensor(self.rewards.weights, dtype=torch.float64, device=device)
        return {
            "prompt_ids": ids,
            "prompt_mask": mask,
            "completion_ids": completion,
            "completion_mask": keep.long() * real.long().unsqueeze(1),
            "real": real,
            "rewards_per_func": per_func,
            "rewards": per_func @ weights,
            "texts": texts,  # type: ignore[dict-item]
        }

    def prepare(
        self,
        model: Any,
        splits: dict[str, Any],
        accelerator: Any,
        batch_size: int,
        saved: Path | None,
        resumed: bool = False,
        start: str | None = None,
        keep: bool = True,
    ) -> None:
        """With a KL term and a starting adapter: its weights, the reference (kept at `saved`)."""
        if self.start and self.section.beta != 0.0:
            self.start_weights = starting_weights(model, saved, resumed, keep, accelerator)

    def begin_step(self, model: Any, group: list[Batch], accelerator: Any) -> Step:
        s, g = self.section, self.section.num_generations
        batches = [self.sample(model, b, g, (self.seed, self.step)) for b in group]
        rewards = torch.cat([b["rewards"] for b in batches]).view(-1, g)
        mean, std = rewards.mean(1, keepdim=True), rewards.std(1, keepdim=True)
        advantages = rewards - mean
        if s.scale_rewards == "group":
            advantages = advantages / (std + 1e-4)  # TRL's epsilon: a group of equal rewards stays 0
        elif s.scale_rewards == "batch":  # the std over every (real) completion of every process
            real = torch.cat([b["real"] for b in batches]).view(-1, g)
            n = torch.stack([real.sum(), (rewards * real).sum(), (rewards.square() * real).sum()])
            n = accelerator.reduce(n, "sum")
            var = (n[2] - n[1] ** 2 / n[0]) / (n[0] - 1).clamp(min=1)
            advantages = advantages / (var.clamp(min=0).sqrt() + 1e-4)
        peft = model.module if hasattr(model, "module") else model
        for b, a, sd in zip(batches, advantages.split([len(b["rewards"]) // g for b in batches]), std.split(
            [len(b["rewards"]) // g for b in batches]), strict=True):  # fmt: skip
            b["advantages"], b["group_std"] = a.reshape(-1), sd.reshape(-1)
            if s.beta != 0.0:
                with torch.no_grad(), as_reference(peft, self.start_weights):
                    b["ref_logps"] = token_logps(peft, b, s.temperature)
        local = torch.stack(
            [sum(b["real"].sum() for b in batches).to(accelerator.device),
             sum(b["completion_mask"].sum() for b in batches).double().to(accelerator.device)]
        )  # fmt: skip
        total = accelerator.reduce(local, "sum")
        one = torch.ones((), dtype=torch.float64, device=accelerator.device)
        return Step(batches, {"completions": total[0], "tokens": total[1].clamp(min=1)}, {"steps": one})

    def loss(self, model: Any, batch: Batch, step: Step) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        s = self.section
        logps = token_logps(model, batch, s.temperature)
        mask = batch["completion_mask"].to(logps.dtype)
        per_token, kl, clipped = grpo_token_loss(
            logps,
            logps.detach(),
            batch.get("ref_logps"),
            batch["advantages"].to(logps.dtype),
            s.beta,
            s.epsilon,
        )
        loss = normalised(per_token, mask, s.loss_type, step.totals, s.max_new_tokens)
        rewards, real = batch["rewards_per_func"], batch["real"]
        groups = real[:: s.num_generations]  # 1 for each group of a real (not repeated) prompt
        sums = {
            "loss": loss.detach().double(),
            "completions": real.sum(),
            "completion_tokens": mask.sum().double(),
            "kl": (kl.detach() * mask).sum().double() if kl is not None else mask.sum().double() * 0,
            "clipped": (clipped * mask).sum().double(),
            "reward": (batch["rewards"] * real).sum(),
            "reward_std": (batch["group_std"] * groups).sum(),
            "groups": groups.sum(),
        }
        for i, name in enumerate(self.rewards.names):
            sums[f"reward_{name}"] = (rewards[:, i] * real).sum()
        return loss, sums

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        n, tokens = max(sums["completions"], 1.0), max(sums["completion_tokens"], 1.0)
        out = {
            "loss": sums["loss"] / max(sums["steps"], 1.0),
            "reward": sums["reward"] / n,
            "reward_std": sums["reward_std"] / max(sums["groups"], 1.0),
            "kl": sums["kl"] / tokens,
            "completion_length": sums["completion_tokens"] / n,
            "clip_fraction": sums["clipped"] / tokens,
        }
        out.update({f"reward_{k}": sums[f"reward_{k}"] / n for k in self.rewards.names})
        return out

    def evaluate(
        self, model: Any, split: Any, accelerator: Any, batch_size: int, final: bool = False
    ) -> dict[str, Any]:
        """Mean reward on the split's prompts: greedy (one answer each) and sampled (a group each,
        seeded by the run's seed alone, so evaluations of two adapters sample alike)."""
        greedy = sampled = 0.0
        examples, samples = split.examples, []
        for start in range(0, len(examples), batch_size):
            prompts = self.collate(
                [examples[i] for i in range(start, min(start + batch_size, len(examples)))]
            )
            prompts = {k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in prompts.items()}
            best = self.sample(model, prompts, 1, None)
            greedy += float(best["rewards"].sum())
            g = self.section.num_generations
            sampled += float(self.sample(model, prompts, g, (self.seed, "eval"))["rewards"].sum()) / g
            for p, c, out in zip(prompts["prompts"], prompts["columns"], best["texts"], strict=True):
                if len(samples) < 3:  # a few greedy answers to read (eval's table shows them)
                    samples.append({"prompt": p, "reference": str(c.get("answer", "")), "output": out})
        n = max(len(examples), 1)
        return {
            "reward": sampled / n,
            "reward_greedy": greedy / n,
            "examples": len(examples),
            "samples": samples,
        }
