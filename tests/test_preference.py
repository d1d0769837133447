"""Preference tuning (DPO and its variants, ORPO, SimPO, KTO) in peftcli's own loop: the same
loss and gradient as TRL on the same pairs, every adapter family trains, 2 processes == 1,
SIGKILL + --resume == uninterrupted, and broken preference data is refused by file and row."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from peftcli.objectives import OBJECTIVES

from .conftest import ROOT, cli, run_cli, write_jsonl, write_recipe

PAIRS = ROOT / "data" / "preference" / "train.jsonl"


@pytest.fixture
def pairs(tmp_path) -> Path:
    lines = PAIRS.read_text().splitlines()[:32]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def rows_of(run: Path) -> list[dict]:
    """The training rows of metrics.jsonl (evaluation rows left out)."""
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def adapter(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run / "adapter" / "adapter_model.safetensors")


def dpo_recipe(tmp_path: Path, train: Path, name: str = "r", **sections) -> Path:
    training = {
        "objective": "dpo",
        "max_steps": 12,
        "batch_size": 8,
        "lr": 3e-3,
        "output_dir": str(tmp_path / name),
    }
    training.update(sections.pop("training", {}))
    return write_recipe(
        tmp_path / f"{name}.yaml",
        data={"train": str(train), "eval": 0.25, "max_length": 48, **sections.pop("data", {})},
        training=training,
        **sections,
    )


# --------------------------------------------------------------------------- against TRL


def _start_adapter(folder: Path) -> Path:
    """A LoRA adapter with random A *and* B, so policy and base differ from the first step."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from peftcli.model import builtin

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(
        builtin.resolve("builtin:tiny-llama", key=""), dtype=torch.float32
    )
    config = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False
    )
    get_peft_model(base, config).save_pretrained(folder)
    return folder


def _policy(start: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from peftcli.model import builtin

    base = AutoModelForCausalLM.from_pretrained(builtin.resolve("builtin:tiny-llama", key=""), dtype=dtype)
    return PeftModel.from_pretrained(base, str(start), is_trainable=True)


def _perturb(model: torch.nn.Module) -> None:
    """Move the trained adapter ("default") away from its starting point, the same way in any
    copy, so that policy and reference differ and every loss is away from its value at zero."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if ".default." in name:
                p.add_(0.3 * torch.randn(p.shape, generator=generator, dtype=p.dtype))


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _peftcli_ids(recipe: Path) -> list[list[int]]:
    """The chosen and rejected token ids peftcli prepares from a recipe's pairs."""
    from peftcli.data.cache import prepare
    from peftcli.model.load import load_tokenizer
    from peftcli.recipe_file import load_recipe

    r = load_recipe(recipe, ["data.eval=0"])
    data = prepare(r.data, load_tokenizer(r.model), r.training.seed, "causal_lm", r.training.objective)
    return [s["input_ids"] for e in data.train.examples for s in (e["chosen"], e["rejected"])]


# The same pairs, tokens and weights give TRL's loss and gradients. Both sides run a float64
# policy, but TRL keeps some float32 arithmetic of its own, so the sides differ at float32's
# level: ~1e-7 relative per term (2e-7 of the loss, 1.5e-6 of a tensor's largest gradient entry
# measured, after the chosen-minus-rejected cancellation over a few hundred positions). The loss
# is compared to 1e-5 absolute and relative (IPO's loss is ~26: its square scales the error),
# gradients to 1e-5 of their tensor's largest entry; a wrong term is off by its whole size.
LOSS_TOL, GRAD_TOL = 1e-5, 1e-5


def same_gradients(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert set(ours) == set(theirs)
    for name, g in ours.items():
        scale = theirs[name].abs().max().clamp(min=1e-6)
        # GRAD_TOL of the largest entry: see its definition
        assert torch.allclose(g, theirs[name], rtol=0, atol=GRAD_TOL * float(scale)), name


@pytest.fixture(scope="module")
def start(tmp_path_factory) -> Path:
    return _start_adapter(tmp_path_factory.mktemp("start") / "adapter")


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """TRL's trainers set up Accelerate's process-wide state with their own settings; later
    in-process runs must start from a clean one."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize(
    "loss_type, smoothing, sft",
    [
        ("sigmoid", 0.0, 0.0),
        ("ipo", 0.0, 0.0),
        ("hinge", 0.0, 0.0),
        ("robust", 0.1, 0.0),
        ("sigmoid", 0.0, 0.5),
    ],
)
def test_dpo_loss_and_gradient_equal_trl(tmp_path, pairs, start, loss_type, smoothing, sft):
    """Each DPO loss variant, and DPO with the chosen answers' SFT loss added (TRL: loss_type
    [sigmoid, sft] with weights [1, w]; peftcli: preference.sft_weight w)."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from peftcli.model import builtin
    from peftcli.objectives.build import build_objective
    from peftcli.objectives.preference import sequence_logps
    from peftcli.recipe import EvalSection, PreferenceSection

    rows = [json.loads(x) for x in pairs.read_text().splitlines()[:8]]
    tok = AutoTokenizer.from_pretrained(builtin.resolve("builtin:tiny-llama", key=""))
    args = DPOConfig(
        output_dir=str(tmp_path / "trl"),
        beta=0.1,
        per_device_train_batch_size=8,
        report_to=[],
        use_cpu=True,
        max_length=64,
        loss_type=[loss_type, "sft"] if sft else [loss_type],
        loss_weights=[1.0, sft] if sft else None,
        label_smoothing=smoothing,
    )
    trainer = DPOTrainer(
        model=_policy(start, torch.float64),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
    )
    batch = next(iter(trainer.get_train_dataloader()))
    # TRL's reference for an adapter it is given is a frozen copy of it ("ref"): peftcli's init_from.
    _perturb(trainer.model)
    trl_loss = trainer.compute_loss(trainer.model, batch)
    trl_loss.backward()

    ids, mask = batch["input_ids"], batch["attention_mask"]
    labels = ids.masked_fill(batch["completion_mask"] == 0, -100)
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    policy = _policy(start, torch.float64)
    with torch.no_grad():
        reference, _ = sequence_logps(policy, inputs)  # the starting adapter, before any update
    _perturb(policy)
    section = PreferenceSection(beta=0.1, loss_type=loss_type, label_smoothing=smoothing, sft_weight=sft)
    objective = build_objective("dpo", "causal_lm", tok, EvalSection(), section)
    objective.reference = {"train": torch.stack(reference.chunk(2), dim=1).double()}
    terms, _ = objective.batch_sums(
        policy, {**inputs, "index": torch.arange(8), "pair_mask": torch.ones(8, dtype=torch.long)}, "train"
    )
    loss = terms["pair_loss"] / 8
    if sft:
        loss = loss + sft * terms["nll"] / (labels[:8, 1:] != -100).sum()
    loss.backward()
    assert float(loss) == pytest.approx(float(trl_loss), rel=LOSS_TOL, abs=LOSS_TOL)  # see LOSS_TOL
    same_gradients(_grads(policy), _grads(trainer.model))
    # ... and peftcli tokenises the pairs exactly as TRL does (BOS + prompt + answer + EOS).
    recipe = dpo_recipe(tmp_path, pairs.with_name("eight.jsonl"))
    write_jsonl(pairs.with_name("eight.jsonl"), rows)
    trl_ids = sorted(row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True))
    assert sorted(_peftcli_ids(recipe)) == trl_ids


def test_dpo_ten_steps_equal_trl(tmp_path, pairs, start, capsys):
    """Ten DPO steps from the same adapter on the same 8 pairs (one batch, so data order cannot
    differ): every step's loss and the final adapter agree with TRL's DPOTrainer (float32, no
    autocast — TRL's configs default to bf16 autocast, which it is told not to use).

    Tolerance: a component whose Adam update differed in sign would be off by 2 × lr = 2e-3;
    float32 rounding of the same sums (relative ~1e-7) moves an update by far less, measured
    1.1e-6 over the ten steps. 1e-5 tells the two apart with two orders of magnitude each way."""
    from datasets import Dataset
    from safetensors.torch import load_file
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from peftcli.model import builtin

    rows = [json.loads(x) for x in pairs.read_text().splitlines()[:8]]
    eight = write_jsonl(tmp_path / "eight.jsonl", rows)
    tok = AutoTokenizer.from_pretrained(builtin.resolve("builtin:tiny-llama", key=""))
    args = DPOConfig(
        output_dir=str(tmp_path / "trl"), beta=0.1, learning_rate=1e-3, per_device_train_batch_size=8,
        max_steps=10, logging_steps=1, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, report_to=[], use_cpu=True, save_strategy="no", max_length=64, bf16=False,
    )  # fmt: skip
    trainer = DPOTrainer(
        model=_policy(start), args=args, train_dataset=Dataset.from_list(rows), processing_class=tok
    )
    trainer.train()
    trl_losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    trl_adapter = {
        n.replace(".default", ""): p.detach() for n, p in trainer.model.named_parameters() if ".default." in n
    }
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    recipe = dpo_recipe(
        tmp_path, eight, "ours",
        model={"dtype": "float32"},
        peft={"init_from": str(start)},
        data={"eval": 0.0, "max_length": 64},
        training={"max_steps": 10, "batch_size": 8, "lr": 1e-3, "scheduler": "linear", "warmup_ratio": 0.0,
                  "mixed_precision": "no"},
    )  # fmt: skip
    code, _, err = cli("train", str(recipe), capsys=capsys)
    assert code == 0, err
    ours = [r["loss"] for r in rows_of(tmp_path / "ours")]
    # float32, ten Adam steps: the docstring's tolerance (a sign flip is 2e-3, rounding ~1e-6).
    assert ours == pytest.approx(trl_losses, abs=1e-5)
    weights = load_file(tmp_path / "ours" / "adapter" / "adapter_model.safetensors")
    assert set(weights) == set(trl_adapter)
    # the docstring's tolerance, as for the losses
    for name, value in weights.items():
        assert torch.allclose(value, trl_adapter[name], rtol=0, atol=1e-5), name


@pytest.mark.parametrize("objective, sft", [("orpo", 0.0), ("simpo", 0.0), ("simpo", 0.5)])
def test_orpo_and_simpo_equal_trl(tmp_path, pairs, start, objective, sft):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    from peftcli.model import builtin
    from peftcli.objectives.build import build_objective
    from peftcli.recipe import EvalSection, PreferenceSection

    rows = [json.loads(x) for x in pairs.read_text().splitlines()[:8]]
    tok = AutoTokenizer.from_pretrained(builtin.resolve("builtin:tiny-llama", key=""))
    common = {
        "output_dir": str(tmp_path / "trl"),
        "per_device_train_batch_size": 8,
        "report_to": [],
        "use_cpu": True,
        "max_length": 64,
        "remove_unused_columns": False,
    }
    if objective == "orpo":
        trainer_class, args = ORPOTrainer, ORPOConfig(beta=0.5, **common)
        section = PreferenceSection(orpo_lambda=0.5)
    else:  # SimPO is CPO's simpo loss; cpo_alpha is its behaviour-cloning term (sft_weight)
        trainer_class = CPOTrainer
        args = CPOConfig(loss_type="simpo", cpo_alpha=sft, beta=2.0, simpo_gamma=0.5, **common)
        section = PreferenceSection(beta=2.0, gamma=0.5, sft_weight=sft)
    trainer = trainer_class(
        model=_policy(start, torch.float64),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
    )
    batch = next(iter(trainer.get_train_dataloader()))
    trl_loss, trl_metrics = trainer.get_batch_loss_metrics(trainer.model, batch, "train")
    trl_loss.backward()

    width = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])

    def both(key: str, fill: int) -> torch.Tensor:
        parts = [batch[f"{side}_{key}"] for side in ("chosen", "rejected")]
        return torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1]), value=fill) for p in parts])

    inputs = {
        "input_ids": both("input_ids", tok.pad_token_id),
        "attention_mask": both("attention_mask", 0),
        "labels": both("labels", -100),
        "index": torch.arange(8),
        "pair_mask": torch.ones(8, dtype=torch.long),
    }
    policy = _policy(start, torch.float64)
    terms, _ = build_objective(objective, "causal_lm", tok, EvalSection(), section).batch_sums(
        policy, inputs, "train"
    )
    loss = terms["pair_loss"] / 8
    if objective == "orpo":
        # The odds-ratio term is TRL's. The likelihood term differs by design: peftcli's is over
        # the chosen answer (the ORPO paper's SFT loss, and peftcli's SFT), TRL's over prompt and
        # answer; so the comparison is of the odds-ratio term, and of the log-probabilities.
        assert float(loss) == pytest.approx(
            -0.5 * float(trl_metrics["log_odds_ratio"]), abs=LOSS_TOL
        )  # see LOSS_TOL
        return
    if sft:  # CPO's behaviour-cloning term: the chosen answers' mean token NLL
        loss = loss + sft * terms["nll"] / (inputs["labels"][:8, 1:] != -100).sum()
    loss.backward()
    assert float(loss) == pytest.approx(float(trl_loss), rel=LOSS_TOL, abs=LOSS_TOL)  # see LOSS_TOL
    same_gradients(_grads(policy), _grads(trainer.model))


# --------------------------------------------------------------------------- objectives × methods

# The grid, as tests/test_methods.py has methods × models: every case trains through the real
# pipeline and one helper checks it. By default a selection that takes every objective and
# every adapter family through training once (fewer runs than the per-objective tests it
# replaced); `make test-all` runs every pair.
FAMILIES = ["lora", "qlora", "dora", "ia3", "prompt-tuning", "adapter"]
PREFERENCE_OBJECTIVES = [o for o, spec in OBJECTIVES.items() if not spec.task_loss and not spec.generates]
DEFAULT = {("dpo", "lora"), ("dpo", "qlora"), ("dpo", "prompt-tuning"), ("orpo", "dora"), ("simpo", "ia3"),
           ("kto", "adapter")}  # fmt: skip
# Measured (2026-12-06), not tuned away: KTO with IA3's scaling vectors leaves the held-out
# margin at −0.05 after its 12 steps; every other pair passes. Not strict: a margin this near 0
# may land on either side on another CPU.
WEAK = {("kto", "ia3"): "KTO + IA3: held-out reward margin -0.05 after 12 steps"}
GRID = [
    pytest.param(
        o,
        m,
        id=f"{o}-{m}",
        marks=[
            *([] if (o, m) in DEFAULT else [pytest.mark.slow]),
            *([pytest.mark.xfail(reason=WEAK[o, m], strict=False)] if (o, m) in WEAK else []),
        ],
    )
    for o in PREFERENCE_OBJECTIVES
    for m in FAMILIES
]
# The loss while the policy is its reference (a family that starts as the identity, first step):
# DPO −log σ(0) = ln 2; KTO 1 − σ(0) = 1/2 per answer (desirable_weight = undesirable_weight = 1,
# and the KL estimate is 0).
AT_REFERENCE = {"dpo": math.log(2), "kto": 0.5}


def kto_answers(tmp_path: Path, pairs: Path) -> Path:
    """The pairs as KTO's unpaired answers: chosen desirable, rejected not."""
    answers = [
        {"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}
        for r in map(json.loads, pairs.read_text().splitlines())
        for side in ("chosen", "rejected")
    ]
    return write_jsonl(tmp_path / "kto.jsonl", answers)


@pytest.mark.parametrize("objective, method", GRID)
def test_objective_trains_every_adapter_family(tmp_path, pairs, capsys, objective, method):
    """Loss falls; the reward margin on held-out pairs (answers) rises from 0, and so does the
    reward accuracy of pairs (KTO's, the share of answers whose reward has its label's sign,
    moves less in 12 steps: 0.56 measured with bottleneck adapters)."""
    paired = OBJECTIVES[objective].formats == ("preference",)
    data = pairs if paired else kto_answers(tmp_path, pairs)
    lr = {"ia3": 3e-2, "prompt-tuning": 3e-2}.get(method, 3e-3)
    training = {"objective": objective, "lr": lr, "max_steps": 12 if objective == "kto" else 10}
    recipe = dpo_recipe(tmp_path, data, peft={"method": method}, training=training)
    code, _, err = cli("train", str(recipe), capsys=capsys)
    assert code == 0, err
    run = tmp_path / "r"
    rows = rows_of(run)
    first = rows[0]
    if objective in AT_REFERENCE and method != "prompt-tuning":
        # Every family but prompt tuning starts as the identity: exact but for DoRA's weight-norm
        # rounding (~1e-7 relative, damped by β/4 in the loss) and metrics.jsonl's 6 decimals
        # (5e-7); 1e-5 covers both.
        assert first["loss"] == pytest.approx(AT_REFERENCE[objective], abs=1e-5), first
    assert paired or "kl" in first
    final = json.loads((run / "eval.json").read_text())
    assert final["reward_margin"] > 0 and (final["reward_accuracy"] >= 0.75 or not paired), final
    assert rows[-1]["loss"] < first["loss"]


# --------------------------------------------------------------------------- processes, resume


@pytest.mark.parametrize("objective", ["dpo", "orpo", "kto"])
def test_gradient_accumulation_equals_one_big_batch(tmp_path, pairs, capsys, objective):
    """4 pairs × 2 accumulated == 8 pairs at once (float64): every term is normalised over the
    whole step's pairs, the SFT terms over its chosen tokens (DPO with sft_weight, ORPO), KTO's
    KL estimate is the mean over all its micro-batches."""
    from .test_train import EXACT

    data = kto_answers(tmp_path, pairs) if objective == "kto" else pairs
    common = {
        "model": {"dtype": "float64"},
        "data": {"eval": 0.0},
        "preference": {"sft_weight": 0.5},
    }
    runs = {}
    for name, batch, accum in (("big", 8, 1), ("accumulated", 4, 2)):
        training = {"objective": objective, "batch_size": batch, "grad_accum": accum, "max_steps": 4,
                    "mixed_precision": "no"}  # fmt: skip
        recipe = dpo_recipe(tmp_path, data, name, **common, training=training)
        assert cli("train", str(recipe), capsys=capsys)[0] == 0
        runs[name] = tmp_path / name
    # float64: losses to metrics.jsonl's 6 decimals (neighbours are 1e-6 apart: 2e-6), weights
    # to EXACT (its reason at its definition in test_train.py).
    for a, b in zip(rows_of(runs["big"]), rows_of(runs["accumulated"]), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=2e-6), (a, b)
    big, accumulated = adapter(runs["big"]), adapter(runs["accumulated"])
    # float64 weights: EXACT, as said above
    for key in big:
        assert torch.allclose(big[key], accumulated[key], rtol=0, atol=EXACT), key


def test_dpo_two_processes_equal_one_process(tmp_path, pairs, capsys):
    """2 processes × 3 pairs == 1 process × 6 pairs, float64, across an uneven epoch end: the
    reference is assembled from both processes' shares, repeated pairs count nothing."""
    from .test_train import EXACT

    common = {"model": {"dtype": "float64"}, "data": {"eval": 0.1}}
    one = dpo_recipe(
        tmp_path, pairs, "one", **common, training={"batch_size": 6, "max_steps": 8, "mixed_precision": "no"}
    )
    two = dpo_recipe(
        tmp_path, pairs, "two", **common, training={"batch_size": 3, "max_steps": 8, "mixed_precision": "no"}
    )
    assert cli("train", str(one), capsys=capsys)[0] == 0
    code, _, err = cli("train", str(two), "--num-processes", "2", capsys=capsys)
    assert code == 0, err
    a_rows, b_rows = rows_of(tmp_path / "one"), rows_of(tmp_path / "two")
    assert a_rows[-1]["epoch"] > 1
    # float64: metrics to metrics.jsonl's 6 decimals (neighbours are 1e-6 apart: 2e-6), weights
    # to EXACT (its reason at its definition in test_train.py).
    for a, b in zip(a_rows, b_rows, strict=True):
        for key in ("loss", "reward_margin", "reward_accuracy", "logps_chosen"):
            # 6 decimals, as said above
            if key in a:
                assert a[key] == pytest.approx(b[key], abs=2e-6), (key, a, b)
    a, b = adapter(tmp_path / "one"), adapter(tmp_path / "two")
    # float64: EXACT
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=0, atol=EXACT), key


@pytest.mark.slow  # `make test-all`
def test_dpo_under_fsdp2_equals_one_process(tmp_path, pairs, capsys):
    """The same DPO recipe under FSDP2 (configs/fsdp-cpu.yaml: 2 processes, sharded base) logs
    the 1-process losses and rewards: the reference is scored through the sharded model too."""
    common = {"model": {"dtype": "float64"}, "data": {"eval": 0.0}}
    one = dpo_recipe(
        tmp_path, pairs, "one", **common, training={"batch_size": 8, "max_steps": 4, "mixed_precision": "no"}
    )
    two = dpo_recipe(
        tmp_path, pairs, "two", **common, training={"batch_size": 4, "max_steps": 4, "mixed_precision": "no"}
    )
    assert cli("train", str(one), capsys=capsys)[0] == 0
    code, _, err = cli(
        "train", str(two), "--launch-config", str(ROOT / "configs" / "fsdp-cpu.yaml"), capsys=capsys
    )
    assert code == 0, err
    assert "FSDP2" in json.dumps(
        json.loads((tmp_path / "two" / "eval.json").read_text())["train"]["distributed"]
    )
    # float64: equal to metrics.jsonl's 6 decimals (neighbours are 1e-6 apart: 2e-6).
    for a, b in zip(rows_of(tmp_path / "one"), rows_of(tmp_path / "two"), strict=True):
        for key in ("loss", "reward_margin", "logps_chosen"):
            assert a[key] == pytest.approx(b[key], abs=2e-6), (key, a, b)


def test_dpo_sigkill_then_resume_equals_uninterrupted(tmp_path, pairs, capsys):
    from .test_resume import kill_after_first_checkpoint

    steps, every = 60, 20
    settings = {
        "training": {"max_steps": steps, "batch_size": 4, "save_every": every, "lr": 1e-3},
        "data": {"eval": 0.0},
    }
    recipe = dpo_recipe(tmp_path, pairs, "run", **settings)
    run = tmp_path / "run"
    import tests.test_resume as resume

    assert resume.EVERY == every
    assert kill_after_first_checkpoint(recipe, run) < steps
    assert (run / "reference.safetensors").is_file()
    code, _, err = cli("train", str(recipe), "--resume", capsys=capsys)
    assert code == 0, err
    uninterrupted = dpo_recipe(tmp_path, pairs, "whole", **settings)
    assert cli("train", str(uninterrupted), capsys=capsys)[0] == 0
    got, want = rows_of(run), rows_of(tmp_path / "whole")
    assert [r["step"] for r in got] == list(range(1, steps + 1))
    # float32: resuming replays the same kernels on the same batches, equal bit for bit (0
    # measured); the tolerances admit rounding-level noise only, while a lost optimizer moment or
    # reference moves weights by up to lr = 1e-3 per Adam step.
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], rel=1e-5)
    a, b = adapter(run), adapter(tmp_path / "whole")
    # float32 weights |w| < 0.2: 1e-6 is ~10 ulp, rounding-level only (as said above)
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key


# --------------------------------------------------------------------------- SFT → DPO, eval


def test_sft_then_dpo_then_eval(tmp_path, pairs, capsys):
    """Two recipes: SFT, then DPO starting from (and referenced to) the SFT adapter; `eval`
    reports preference accuracy against it; a mismatched method is refused."""
    sft_data = write_jsonl(
        tmp_path / "sft.jsonl",
        [
            {"prompt": json.loads(x)["prompt"], "completion": json.loads(x)["rejected"]}
            for x in pairs.read_text().splitlines()
        ],
    )
    sft = write_recipe(
        tmp_path / "sft.yaml",
        data={"train": str(sft_data), "eval": 0.0},
        training={"max_steps": 8, "output_dir": str(tmp_path / "sft")},
    )
    assert cli("train", str(sft), capsys=capsys)[0] == 0
    recipe = dpo_recipe(tmp_path, pairs, "dpo", peft={"init_from": str(tmp_path / "sft")})
    code, _, err = cli("train", str(recipe), capsys=capsys)
    assert code == 0, err
    assert "objective dpo from" in err
    first = rows_of(tmp_path / "dpo")[0]
    # ln 2 = 0.6931472 exactly (policy == reference), as metrics.jsonl rounds it: 1e-6 is one digit
    assert first["loss"] == pytest.approx(0.693147, abs=1e-6), "the reference is the SFT adapter itself"
    code, out, err = cli("eval", str(tmp_path / "dpo"), "--json", capsys=capsys)
    assert code == 0, err
    result = json.loads(out)
    assert {"preference_accuracy", "reward_accuracy", "reward_margin"} <= set(result)
    wrong = dpo_recipe(tmp_path, pairs, "wrong", peft={"method": "ia3", "init_from": str(tmp_path / "sft")})
    code, _, err = cli("train", str(wrong), capsys=capsys)
    assert code == 2 and "is a lora adapter, and peft.method is ia3" in err


# --------------------------------------------------------------------------- user mistakes


def _pair(prompt: str = "Say hi\n", chosen: str = "HI!", rejected: str = "HI.") -> dict:
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


@pytest.mark.parametrize(
    "bad, says",
    [
        ({"prompt": "Say hi\n", "chosen": "HI!"}, "`rejected` is missing"),
        (_pair(rejected="HI!"), "are the same answer"),
        (
            {
                "chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "A!"}],
                "rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "A."}],
            },
            "the prompt differs between `chosen` and `rejected`",
        ),
        (_pair(chosen=["not", "messages"]), "each message of `chosen` needs a role"),
    ],
)
def test_broken_pairs_are_refused_by_file_and_row(tmp_path, bad, says):
    data = write_jsonl(tmp_path / "pairs.jsonl", [_pair(), _pair(), bad])
    recipe = dpo_recipe(tmp_path, data)
    proc = run_cli("validate", str(recipe))
    from .conftest import one_error_line

    line = one_error_line(proc)
    assert says in line and "pairs.jsonl:3" in line, line


def test_preference_recipe_mistakes(tmp_path, pairs, capsys):
    for override, says in [
        ("data.packing=true", "data.packing does not apply to training.objective: dpo"),
        ("data.format=completion", "data.format: completion does not fit training.objective: dpo"),
        ("model.task=seq_cls", "tunes causal language models"),
        ("preference.beta=0", "preference.beta"),
        ("preference.loss_type=sigmod", "did you mean"),
    ]:
        code, _, err = cli("validate", str(dpo_recipe(tmp_path, pairs)), override, capsys=capsys)
        assert code == 2 and says in err, (override, err)
    sft = write_recipe(tmp_path / "sft.yaml", data={"train": str(pairs), "format": "preference"})
    code, _, err = cli("validate", str(sft), capsys=capsys)
    assert code == 2 and "training.objective: dpo | orpo | simpo, not sft" in err


def test_estimate_plans_both_answers_of_a_pair(tmp_path, pairs, capsys):
    """A pair is two sequences in one forward pass: the layers' activations of a DPO batch of B
    pairs are those of an SFT batch of 2B examples; the reference adds no weights."""
    dpo = dpo_recipe(tmp_path, pairs, training={"batch_size": 4})
    code, out, err = cli("estimate", str(dpo), "--json", capsys=capsys)
    assert code == 0, err
    preference = json.loads(out)
    sft = write_recipe(
        tmp_path / "sft.yaml", data={"train": str(PAIRS.with_name("sft.jsonl"))}, training={"batch_size": 8}
    )
    code, out, err = cli("estimate", str(sft), "--json", capsys=capsys)
    assert code == 0, err
    plain = json.loads(out)
    assert preference["plan"]["sequences"] == 8 == plain["plan"]["batch_size"]
    assert preference["activations"]["layers_bytes"] == plain["activations"]["layers_bytes"]
    assert preference["memory"]["weights_bytes"] == plain["memory"]["weights_bytes"]
    code, out, _ = cli("estimate", str(dpo), capsys=capsys)
    assert "4 pairs = 8 sequences" in out and "no second copy of the weights" in out


def test_conversational_pairs_in_both_layouts(tmp_path, capsys):
    """UltraFeedback's layout (a prompt string, and whole conversations as chosen/rejected) and
    TRL's (a prompt as messages, answer-only chosen/rejected) give the same sequences, labelled
    on the final assistant answer only, rendered with the chat template."""
    words = ["cat", "dog", "owl", "fox", "emu", "yak", "elk", "ant"]
    whole = [
        {
            "prompt": f"say {w}",
            "chosen": [
                {"role": "user", "content": f"say {w}"},
                {"role": "assistant", "content": w.upper() + "!"},
            ],
            "rejected": [
                {"role": "user", "content": f"say {w}"},
                {"role": "assistant", "content": w.upper() + "."},
            ],
        }
        for w in words
    ]
    split = [
        {
            "prompt": [{"role": "user", "content": f"say {w}"}],
            "chosen": [{"role": "assistant", "content": w.upper() + "!"}],
            "rejected": [{"role": "assistant", "content": w.upper() + "."}],
        }
        for w in words
    ]
    shown = []
    for name, rows in (("whole", whole), ("split", split)):
        data = write_jsonl(tmp_path / f"{name}.jsonl", rows)
        recipe = dpo_recipe(
            tmp_path, data, name, data={"eval": 0.0}, training={"max_steps": 2, "batch_size": 4}
        )
        code, out, err = cli("data", str(recipe), "--preview", "1", "--json", capsys=capsys)
        assert code == 0, err
        shown.append(json.loads(out)["examples"])
        assert cli("train", str(recipe), capsys=capsys)[0] == 0
    assert shown[0] == shown[1]
    chosen, rejected = shown[0]
    assert chosen["text"].startswith("<|im_start|>user\nsay ") and chosen["target"].endswith("!<|im_end|>")
    assert rejected["target"].endswith(".<|im_end|>") and "user" not in chosen["target"]


@pytest.mark.slow  # `make test-all`
def test_compare_works_with_a_preference_objective(tmp_path, pairs, capsys):
    recipe = dpo_recipe(tmp_path, pairs)
    code, out, err = cli(
        "compare", str(recipe), "--methods", "lora", "--max-steps", "3", "--output-dir", str(tmp_path / "c"), "--json",
        capsys=capsys,
    )  # fmt: skip
    assert code == 0, err
    row = json.loads(out)["rows"][0] if "rows" in json.loads(out) else json.loads(out)[0]
    assert row["preference_accuracy"] is not None and row["reward_accuracy"] is not None
