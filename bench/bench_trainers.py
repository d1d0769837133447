"""One benchmark run in a fresh interpreter: `python bench/bench_trainers.py CONFIG.json RESULT.json`.

CONFIG names the trainer and the shared work (model folder, data files, LoRA and training
settings); RESULT receives what the run measured. The three trainers:

- `peftcli`: `peftcli train RECIPE --overwrite`, in this process (the CLI's own `main`), on a
  recipe written from CONFIG. `peftcli.data.cache.prepare` and `peftcli.model.load.load_model` are wrapped
  with timers; nothing else is touched.
- `trl`: TRL's `SFTTrainer` with `peft_config=LoraConfig(...)` on the prompt/completion JSON
  lines (TRL's prompt-completion format: completion-only loss), `packing=True` for packing.
- `trainer`: the hand-written baseline: tokenise prompt + completion + EOS, label the prompt
  -100, `DataCollatorForSeq2Seq` padding, transformers `Trainer` on `get_peft_model(...)`.

Train time is the training loop only (first to last optimizer step): peftcli's own `seconds`,
and `on_train_begin` to `on_train_end` for the `Trainer`-based ones. Each reports the real and
padded token positions it fed the model, its per-step losses, and the loss per supervised
token on the eval file, computed the same way for all three.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Any

IGNORE = -100
STARTED = time.perf_counter()


class HeapPeak(threading.Thread):
    """The most memory malloc held live at once (glibc `mallinfo2`: bytes in use in every arena
    plus mmapped chunks), sampled every 10 ms. Unlike the peak RSS it does not count memory
    the allocator keeps after a free (fragmentation), so it is what the trainer really needed
    and is repeatable from run to run."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = 0
        self.info = None
        try:
            libc = ctypes.CDLL("libc.so.6")
            libc.mallinfo2.restype = type("mallinfo2", (ctypes.Structure,), {"_fields_": MALLINFO2})
            self.info = libc.mallinfo2
        except (OSError, AttributeError):  # not glibc (>= 2.33)
            pass

    def sample(self) -> None:
        m = self.info()
        self.peak = max(self.peak, m.uordblks + m.hblkhd)

    def run(self) -> None:
        while self.info is not None:
            self.sample()
            time.sleep(0.01)


MALLINFO2 = [
    (name, ctypes.c_size_t)
    for name in (
        "arena",
        "ordblks",
        "smblks",
        "hblks",
        "hblkhd",
        "usmblks",
        "fsmblks",
        "uordblks",
        "fordblks",
        "keepcost",
    )
]


def lora_config(cfg: dict[str, Any]) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=cfg["r"],
        lora_alpha=cfg["alpha"],
        lora_dropout=0.0,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )


def model_kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch

    dtype = torch.bfloat16 if cfg["precision"] == "bf16" else torch.float32
    kwargs: dict[str, Any] = {"dtype": dtype}
    if cfg["quantization"] == "4bit":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=dtype,
        )
    if torch.cuda.is_available():
        kwargs["device_map"] = {"": 0}
    return kwargs


def load_base(cfg: dict[str, Any]) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(cfg["model"], **model_kwargs(cfg))
    if cfg["quantization"] == "4bit":
        from peft import prepare_model_for_kbit_training

        # As TRL's SFTTrainer does for a k-bit model (fp32 embeddings, head and norms; peftcli keeps
        # them in the compute dtype); no gradient checkpointing, so every trainer does the same work.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model


def training_args(cfg: dict[str, Any]) -> dict[str, Any]:
    """TrainingArguments shared by both Trainer-based runs: the same schedule as peftcli's recipe."""
    import torch

    return {
        "output_dir": str(Path(cfg["out"]) / "out"),
        "per_device_train_batch_size": cfg["batch_size"],
        "gradient_accumulation_steps": 1,
        "num_train_epochs": cfg["epochs"],
        "learning_rate": cfg["lr"],
        "lr_scheduler_type": "cosine",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "optim": "adamw_torch",
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "seed": cfg["seed"],
        "bf16": cfg["precision"] == "bf16",
        "use_cpu": not torch.cuda.is_available(),
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
        "gradient_checkpointing": False,
    }


class Counting:
    """Wraps a data collator: counts the real and padded positions and the supervised tokens."""

    def __init__(self, collate: Any):
        self.collate = collate
        self.positions = self.real = self.supervised = 0

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collate(features)
        ids = batch["input_ids"]
        self.positions += ids.numel()
        mask = batch.get("attention_mask")
        self.real += int(mask.sum()) if mask is not None else ids.numel()
        self.supervised += int((batch["labels"][:, 1:] != IGNORE).sum())
        return batch


def timer_callback(times: dict[str, float]) -> Any:
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            times["train_begin"] = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            times["train_end"] = time.perf_counter()

    return Timer()


def encode(rows: list[dict[str, str]], tokenizer: Any, max_length: int) -> list[dict[str, list[int]]]:
    """prompt + completion + EOS, the prompt labelled -100, truncated to max_length."""
    prompts = tokenizer([r["prompt"] for r in rows], add_special_tokens=False)["input_ids"]
    answers = tokenizer([r["completion"] for r in rows], add_special_tokens=False)["input_ids"]
    out = []
    for p, a in zip(prompts, answers, strict=True):
        a = a + [tokenizer.eos_token_id]
        out.append({"input_ids": (p + a)[:max_length], "labels": ([IGNORE] * len(p) + a)[:max_length]})
    return out


def eval_loss(model: Any, tokenizer: Any, path: str, max_length: int, batch_size: int) -> float:
    """Loss per supervised token over the eval file (the definition peftcli's eval uses)."""
    import torch
    import torch.nn.functional as F

    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    examples = encode(rows, tokenizer, max_length)
    device = next(p for p in model.parameters()).device
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            chunk = examples[i : i + batch_size]
            longest = max(len(e["input_ids"]) for e in chunk)
            ids = torch.full((len(chunk), longest), tokenizer.pad_token_id)
            labels = torch.full((len(chunk), longest), IGNORE)
            mask = torch.zeros((len(chunk), longest), dtype=torch.long)
            for j, e in enumerate(chunk):
                n = len(e["input_ids"])
                ids[j, :n], labels[j, :n], mask[j, :n] = (
                    torch.tensor(e["input_ids"]),
                    torch.tensor(e["labels"]),
                    1,
                )
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(
                    input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False
                ).logits
            shifted = labels[:, 1:].to(device)
            total += float(
                F.cross_entropy(
                    logits[:, :-1].float().flatten(0, 1),
                    shifted.flatten(),
                    ignore_index=IGNORE,
                    reduction="sum",
                )
            )
            count += int((shifted != IGNORE).sum())
    return total / max(count, 1)


def step_losses(log_history: list[dict[str, Any]]) -> list[float]:
    return [row["loss"] for row in log_history if "loss" in row and "step" in row]


# --------------------------------------------------------------------------- the three trainers


def trainer_result(
    trainer: Any, collate: Any, times: dict[str, float], tokenizer: Any, cfg: dict[str, Any], **timings: float
) -> dict[str, Any]:
    """What a `Trainer`-based run (the plain script or TRL) measured, in the shared result keys."""
    return {
        **timings,
        "train_s": times["train_end"] - times["train_begin"],
        "steps": trainer.state.global_step,
        "tokens": collate.real,
        "positions": collate.positions,
        "supervised_tokens": collate.supervised,
        "losses": step_losses(trainer.state.log_history),
        "eval_loss": eval_loss(trainer.model, tokenizer, cfg["eval"], cfg["max_length"], cfg["batch_size"])
        if cfg.get("eval")
        else None,
    }


def run_trainer(cfg: dict[str, Any]) -> dict[str, Any]:
    from datasets import load_dataset
    from peft import get_peft_model
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments, set_seed

    if cfg["packing"]:
        raise SystemExit("the plain Trainer baseline has no packing")
    t = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(cfg["model"])
    dataset = load_dataset("json", data_files=cfg["train"], split="train")

    def tokenize(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        rows = [
            {"prompt": p, "completion": c} for p, c in zip(batch["prompt"], batch["completion"], strict=True)
        ]
        examples = encode(rows, tokenizer, cfg["max_length"])
        return {
            "input_ids": [e["input_ids"] for e in examples],
            "attention_mask": [[1] * len(e["input_ids"]) for e in examples],
            "labels": [e["labels"] for e in examples],
        }

    dataset = dataset.map(tokenize, batched=True, remove_columns=dataset.column_names)
    prep_s = time.perf_counter() - t

    t = time.perf_counter()
    set_seed(cfg["seed"])
    model = get_peft_model(load_base(cfg), lora_config(cfg))
    load_s = time.perf_counter() - t

    collate = Counting(DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE))
    times: dict[str, float] = {}
    trainer = Trainer(
        model=model,
        args=TrainingArguments(**training_args(cfg)),
        train_dataset=dataset,
        data_collator=collate,
        callbacks=[timer_callback(times)],
    )
    trainer.train()
    return trainer_result(trainer, collate, times, tokenizer, cfg, prep_s=prep_s, load_s=load_s)


def run_trl(cfg: dict[str, Any]) -> dict[str, Any]:
    try:
        import trl
        from trl import SFTConfig, SFTTrainer
    except ImportError:
        raise SystemExit("TRL is not installed: pip install -e '.[bench]'") from None
    from datasets import load_dataset
    from transformers import AutoTokenizer, set_seed

    tokenizer = AutoTokenizer.from_pretrained(cfg["model"])
    t = time.perf_counter()
    set_seed(cfg["seed"])
    model = load_base(cfg)
    load_s = time.perf_counter() - t

    dataset = load_dataset("json", data_files=cfg["train"], split="train")
    args = SFTConfig(
        **training_args(cfg),
        max_length=cfg["max_length"],
        packing=cfg["packing"],  # default strategy "bfd": best-fit decreasing, padding-free batches
        completion_only_loss=True,
    )
    t = time.perf_counter()
    # Tokenisation, packing and the PEFT wrapping all happen in the constructor.
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora_config(cfg),
    )
    prep_s = time.perf_counter() - t
    collate = trainer.data_collator = Counting(trainer.data_collator)
    times: dict[str, float] = {}
    trainer.add_callback(timer_callback(times))
    trainer.train()
    return {
        **trainer_result(trainer, collate, times, tokenizer, cfg, prep_s=prep_s, load_s=load_s),
        "trl_version": trl.__version__,
        "trl_padding_free": bool(getattr(trainer, "padding_free", False)),
    }


def peftcli_recipe(cfg: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": "bench",
        "model": {
            "name_or_path": cfg["model"],
            "dtype": "bfloat16" if cfg["precision"] == "bf16" else "float32",
            "quantization": cfg["quantization"],
        },
        "peft": {
            "method": "qlora" if cfg["quantization"] == "4bit" else "lora",
            "target_modules": "all-linear",
            "r": cfg["r"],
            "alpha": cfg["alpha"],
            "dropout": 0.0,
        },
        "data": {
            "train": cfg["train"],
            "eval": cfg.get("eval") or 0.0,
            "format": "completion",
            "max_length": cfg["max_length"],
            "packing": cfg["packing"],
            "train_on": "completion",
        },
        "training": {
            "output_dir": str(Path(cfg["out"]) / "run"),
            "epochs": cfg["epochs"],
            "batch_size": cfg["batch_size"],
            "grad_accum": 1,
            "lr": cfg["lr"],
            "scheduler": "cosine",
            "warmup_ratio": 0.0,
            "weight_decay": 0.0,
            "max_grad_norm": 1.0,
            "mixed_precision": "bf16" if cfg["precision"] == "bf16" else "no",
            "seed": cfg["seed"],
            "log_every": 1,
        },
        "eval": {"metrics": ["loss"]},
    }


def run_peftcli(cfg: dict[str, Any]) -> dict[str, Any]:
    import yaml

    import peftcli.data.cache
    import peftcli.model.load
    from peftcli.cli import main

    recipe = Path(cfg["out"]) / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(peftcli_recipe(cfg), sort_keys=False), encoding="utf-8")
    seen: dict[str, Any] = {}

    def timed(module: Any, name: str) -> None:
        inner = getattr(module, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            result = inner(*args, **kwargs)
            seen[name] = (time.perf_counter() - t, result)
            return result

        setattr(module, name, wrapper)

    timed(peftcli.data.cache, "prepare")
    timed(peftcli.model.load, "load_model")
    sys.argv = ["peftcli", "train", str(recipe), "--overwrite"]
    try:
        main()
    except SystemExit as exc:
        if exc.code:
            raise
    run = Path(cfg["out"]) / "run"
    result = json.loads((run / "eval.json").read_text(encoding="utf-8"))
    summary = result["train"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    prepared = seen["prepare"][1]
    # peftcli's own account of its padding: the batches of one epoch in the order it trains
    # (the seeded shuffle Accelerate draws), padded to the longest row of each.
    pad = peftcli.data.padding_fraction(prepared.train.lengths(), cfg["batch_size"], cfg["seed"], False)
    return {
        "prep_s": seen["prepare"][0],
        "load_s": seen["load_model"][0],
        "train_s": summary["seconds"],
        "steps": summary["steps"],
        "tokens": summary["tokens"],
        "positions": round(summary["tokens"] / (1 - pad)),
        "supervised_tokens": summary["supervised_tokens"],
        "losses": [r["loss"] for r in rows if "loss" in r],
        "eval_loss": result.get("loss"),
        "packed_rows": len(prepared.train.examples) if cfg["packing"] else None,
    }


def run_plain(cfg: dict[str, Any]) -> dict[str, Any]:
    """The ceiling on a GPU: `get_peft_model` + LoRA, bf16 autocast, dense random batches of
    batch × max length (no padding, no data pipeline), the model's own loss over every position,
    AdamW. `plain_steps` timed steps after 3 warm-up steps."""
    import torch
    from peft import get_peft_model
    from transformers import set_seed

    set_seed(cfg["seed"])
    t = time.perf_counter()
    model = get_peft_model(load_base(cfg), lora_config(cfg)).train()
    load_s = time.perf_counter() - t
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg["lr"])
    device = next(model.parameters()).device
    shape = (cfg["batch_size"], cfg["max_length"])
    ids = torch.randint(0, model.config.vocab_size, shape, device=device)
    steps, warm, losses = cfg.get("plain_steps", 20), 3, []
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg["precision"] == "bf16")
    for step in range(warm + steps):
        if step == warm:
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    if device.type == "cuda":
        torch.cuda.synchronize()
    tokens = steps * shape[0] * shape[1]
    return {
        "prep_s": 0.0,
        "load_s": load_s,
        "train_s": time.perf_counter() - started,
        "steps": steps,
        "tokens": tokens,
        "positions": tokens,
        "supervised_tokens": tokens,
        "losses": [float(x) for x in losses[warm:]],
        "eval_loss": None,
    }


RUNNERS = {"peftcli": run_peftcli, "trl": run_trl, "trainer": run_trainer, "plain": run_plain}


def main(config_path: str, result_path: str) -> None:
    cfg = json.loads(Path(config_path).read_text(encoding="utf-8"))
    heap = HeapPeak()
    heap.start()
    import torch

    torch.set_num_threads(cfg["threads"])
    result = RUNNERS[cfg["trainer"]](cfg)
    result["wall_s"] = time.perf_counter() - STARTED
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if heap.info is not None:
        result["peak_heap_mib"] = heap.peak / 2**20
    if torch.cuda.is_available():
        result["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
    result["torch_threads"] = torch.get_num_threads()
    Path(result_path).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main(*sys.argv[1:3])
