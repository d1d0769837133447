"""LoRA initialisations (`peft.init`) and variants (rslora, LoRA+, rank/alpha patterns): the
saved adapter, loaded by plain PEFT on the ORIGINAL base, is the trained model; two loads agree
exactly; merge equals the adapter; resume is bit-exact; LoRA+ gives B its learning rate; EVA's
init is visible and seeded; wrong combinations end with exit 2 and one line naming the key."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from peftcli.recipe_file import load_recipe
from peftcli.training.run import train

from .conftest import cli, one_error_line, run_cli, write_recipe
from .test_resume import kill_after_first_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

# float32 logits of |x| ≤ ~5: the trained model computes W_res·x + s·BA·x, the converted adapter
# W·x + s·[B|−B₀][A;A₀]·x. W_res = W − s·B₀A₀ rounds each weight once (ε = 1.2e-7 relative), and
# the two forms sum the same products in another order: per layer ≤ ~d·ε·|W||x| with d = 128
# inputs, through 4-5 layers and the head, bounded by ~1e-4 absolute (measured: ≤ 6e-6).
# A wrong conversion (the raw PiSSA adapter on the original base) is off by ~5.
CONVERTED_ATOL = 1e-4

GRID = [
    ("tiny-llama", "lora", "gaussian"),
    ("tiny-llama", "lora", "pissa"),
    ("tiny-llama", "lora", "pissa_niter_2"),
    ("tiny-llama", "lora", "olora"),
    ("tiny-llama", "lora", "eva"),
    ("tiny-gpt2", "lora", "gaussian"),
    pytest.param("tiny-gpt2", "lora", "pissa", marks=pytest.mark.slow),  # pissa_niter_2 covers GPT-2
    ("tiny-gpt2", "lora", "pissa_niter_2"),
    ("tiny-gpt2", "lora", "eva"),
    ("tiny-llama", "qlora", "gaussian"),
    ("tiny-llama", "qlora", "loftq"),
    # EVA on a 4-bit base: the same hooks on PEFT's Linear4bit; lora-eva proves the init
    pytest.param("tiny-llama", "qlora", "eva", marks=pytest.mark.slow),
]


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids.to(model.device)).logits.float().cpu()


def plain_peft(recipe, adapter: Path):
    """The adapter as any reader loads it: PEFT on the original base (4-bit NF4 for qlora)."""
    from peft import PeftModel

    from peftcli.model.load import load_model

    return PeftModel.from_pretrained(load_model(recipe.model), str(adapter))


@pytest.mark.parametrize(("model", "method", "init"), GRID, ids=lambda x: x)
def test_the_saved_adapter_on_the_original_base_is_the_trained_model(
    tmp_path, completion_data, model, method, init
):
    from peftcli.merging import merged_in_memory, open_sources

    path = write_recipe(
        tmp_path / "r.yaml",
        model={"name_or_path": f"builtin:{model}"},
        peft={"method": method, "init": init},
        data={"eval": 0.0},
        training={"max_steps": 3, "lr": 0.01},
    )
    recipe = load_recipe(path)
    trained = train(recipe)
    ids = torch.tensor([trained.tokenizer("Uppercase: qpzirpwh\nQPZ")["input_ids"]])
    want = logits(trained.model, ids)
    adapter = tmp_path / "run" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["init_lora_weights"] in (True, "gaussian", "eva")  # a reader never re-runs an SVD
    if init.startswith(("pissa", "olora")):
        assert config["r"] == 8 and config["lora_alpha"] == 16, "converted: rank 2r, alpha 2·alpha"
    loaded = plain_peft(recipe, adapter)
    layers = {n for n, _ in loaded.named_parameters() if "lora_A" in n}
    trained_layers = {n for n, _ in trained.model.named_parameters() if "lora_A" in n}
    assert layers == trained_layers, "the reader builds the trained layers, no more (EVA drops some)"
    first, second = logits(loaded, ids), logits(plain_peft(recipe, adapter), ids)
    assert torch.equal(first, second), "two loads give the same model"
    # CONVERTED_ATOL: float32 rounding of the residual weights and summation order (see above)
    assert torch.allclose(first, want, atol=CONVERTED_ATOL), (first - want).abs().max()
    merged = logits(merged_in_memory(open_sources([tmp_path / "run"])[0]), ids)
    # CONVERTED_ATOL: merging adds s·BA to each float32 weight once (and dequantizes NF4 exactly)
    assert torch.allclose(merged, want, atol=CONVERTED_ATOL), (merged - want).abs().max()


def test_fast_pissa_resumes_bit_exact_after_sigkill(tmp_path, completion_data, capsys):
    """Randomized SVD (pissa_niter_2) is seeded by training.seed: the resumed run re-initialises
    the same residual base, and its checkpoints' conversion leaves the RNG (dropout) untouched."""
    from .test_resume import EVERY

    recipe = write_recipe(
        tmp_path / "r.yaml",
        peft={"init": "pissa_niter_2", "dropout": 0.1},
        data={"eval": 0.0},
        training={"max_steps": 3 * EVERY, "batch_size": 4, "save_every": EVERY, "lr": 1e-3},
    )
    run = tmp_path / "run"
    kill_after_first_checkpoint(recipe, run)
    code, _, err = cli("train", str(recipe), "--resume", capsys=capsys)
    assert code == 0 and "resuming" in err, err
    train(load_recipe(recipe, [f"training.output_dir={tmp_path / 'again'}"]))
    resumed, rerun = weights(run), weights(tmp_path / "again")
    assert resumed.keys() == rerun.keys()
    diff = max((resumed[k] - rerun[k]).abs().max().item() for k in resumed)
    assert diff == 0, diff


def weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run / "adapter" / "adapter_model.safetensors")


def b_lr(checkpoint: Path) -> tuple[float, float]:
    """(base lr, B's lr) read back from a checkpoint's optimizer state."""
    groups = torch.load(checkpoint / "optimizer.pt", weights_only=True)["param_groups"]
    named = {g.get("name"): g["lr"] for g in groups}
    return groups[0]["lr"], named["lora_B"]


def test_eva_and_lora_plus_resume_bit_exact_and_b_learns_at_its_ratio(tmp_path, completion_data, capsys):
    steps, every, ratio = 12, 4, 16
    recipe = write_recipe(
        tmp_path / "r.yaml",
        peft={"init": "eva", "lora_plus_ratio": ratio, "rslora": True},
        data={"eval": 0.0},
        training={"max_steps": steps, "save_every": every, "keep_checkpoints": 3, "lr": 1e-3},
    )
    code, _, err = cli("train", str(recipe), capsys=capsys)
    assert code == 0, err
    assert "eva: initialised A from the layer inputs of" in err
    from peftcli.commands.compare import run_variants

    assert run_variants(tmp_path / "run") == f"init eva; rslora; lora+ ×{ratio}"  # compare's column
    run, again = tmp_path / "run", tmp_path / "again"
    base, b = b_lr(run / "checkpoints" / f"step-{every}")
    assert b == pytest.approx(ratio * base, rel=1e-12)  # both are lr × the same schedule factor, in float64
    again.mkdir()  # the run as if killed after its first checkpoint
    shutil.copy(run / ".peftcli", again / ".peftcli")
    shutil.copy(run / "recipe.yaml", again / "recipe.yaml")
    shutil.copytree(run / "checkpoints" / f"step-{every}", again / "checkpoints" / f"step-{every}")
    (again / ".incomplete").touch()
    code, _, err = cli("train", str(recipe), f"training.output_dir={again}", "--resume", capsys=capsys)
    assert code == 0 and f"from step-{every}" in err, err
    base, b = b_lr(again / "checkpoints" / f"step-{2 * every}")  # saved by the resumed run
    assert b == pytest.approx(ratio * base, rel=1e-12)  # as above: one float64 product
    resumed, uninterrupted = weights(again), weights(run)
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)


def test_eva_init_is_visible_and_seeded(tmp_path, completion_data):
    """EVA's A rows are the top principal directions of each layer's inputs (unit vectors),
    not PEFT's Kaiming draw, and the same data and seed give the same A."""
    from functools import partial

    from peftcli.data.batching import collate
    from peftcli.data.cache import prepare
    from peftcli.methods.apply import apply_method
    from peftcli.methods.inits import eva
    from peftcli.model.load import load_model, load_tokenizer
    from peftcli.training.loop import make_loader

    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", peft={"init": "eva"}, data={"eval": 0.0}))
    tokenizer = load_tokenizer(recipe.model)
    data = prepare(recipe.data, tokenizer, 42, "causal_lm", "sft")

    def a_matrices(init: str) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = apply_method(
            load_model(recipe.model), recipe.peft.model_copy(update={"init": init}), "causal_lm"
        )
        if init == "eva":
            batches = list(
                make_loader(data, recipe.training, partial(collate, pad_id=tokenizer.pad_token_id))
            )
            assert (
                eva(model, batches, model.device) >= 2
            )  # one pass to find equal inputs, then the SVD passes
        return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}

    first, second, default = a_matrices("eva"), a_matrices("eva"), a_matrices("default")
    assert all(torch.equal(first[k], second[k]) for k in first)
    q = next(k for k in first if "q_proj" in k)
    rows = first[q].norm(dim=1)
    # float32 unit vectors from an SVD: |‖row‖ − 1| ~ 1e-6; 1e-4 leaves room for the incremental PCA
    assert torch.allclose(rows[rows > 0], torch.ones_like(rows[rows > 0]), atol=1e-4)
    assert first[q].shape != default[q].shape or not torch.allclose(first[q], default[q])


def test_rank_pattern_counts_exactly_in_estimate(tmp_path, completion_data):
    from peftcli.commands.estimate import estimate
    from peftcli.model.load import load_config

    path = write_recipe(tmp_path / "r.yaml", peft={"target_modules": ["q_proj", "down_proj"]})
    plain = estimate(load_recipe(path))
    patterned = estimate(load_recipe(path, ["peft.rank_pattern={down_proj: 12}", "peft.rslora=true"]))
    c = load_config(load_recipe(path).model)
    # each layer's down_proj: r·(intermediate + hidden) parameters, now 12 instead of 4
    extra = c.num_hidden_layers * (12 - 4) * (c.intermediate_size + c.hidden_size)
    assert patterned["trainable_params"] == plain["trainable_params"] + extra
    assert "rank_pattern down_proj=12" in patterned["plan"]["variants"]


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["peft.init=loftq"], "peft.init: loftq"),
        (["peft.method=ia3", "peft.init=pissa"], "peft.init: pissa"),
        (["peft.method=qlora", "peft.init=olora"], "peft.init: olora"),
        (["peft.init=corda"], "peft.init: corda"),
        (["peft.options={use_rslora: true}"], "peft.options.use_rslora"),
        (["peft.options={init_lora_weights: pissa_niter_2}"], "peft.options.init_lora_weights"),
        (["peft.method=ia3", "peft.lora_plus_ratio=16"], "peft.lora_plus_ratio"),
        (["peft.init=pissa", "peft.rslora=true", "peft.alpha_pattern={q_proj: 4}"], "peft.init: pissa"),
        (["model.name_or_path=builtin:tiny-gpt2", "peft.init=olora"], "peft.init: olora"),
        (["peft.init_from=elsewhere", "peft.rslora=true"], "peft.rslora"),
    ],
)
def test_wrong_combinations_end_with_one_line(tmp_path, completion_data, capsys, overrides, key):
    path = write_recipe(tmp_path / "r.yaml")
    code, _, err = cli("validate", str(path), *overrides, capsys=capsys)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and key in errors[0], err


def test_a_user_sees_one_line_in_a_fresh_process(tmp_path, completion_data):
    path = write_recipe(tmp_path / "r.yaml", peft={"method": "ia3", "init": "pissa"})
    line = one_error_line(run_cli("train", str(path), cwd=tmp_path))
    assert "peft.init: pissa does not work with peft.method: ia3" in line


def test_loftq_brings_the_4bit_base_closer_to_the_original(tmp_path, completion_data):
    from safetensors.torch import load_file

    from peftcli.methods.apply import apply_method
    from peftcli.model.builtin import resolve
    from peftcli.model.load import load_model

    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", peft={"method": "qlora", "init": "loftq"}))
    model = apply_method(load_model(recipe.model), recipe.peft, "causal_lm")
    original = load_file(Path(resolve(recipe.model.name_or_path)) / "model.safetensors")
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    w = original["model.layers.0.mlp.down_proj.weight"].float()
    import bitsandbytes as bnb

    base = layer.get_base_layer().weight
    quantized = bnb.functional.dequantize_4bit(base.data, base.quant_state).float()
    with torch.no_grad():
        delta = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    residual = w - quantized
    # The best rank-r correction (Eckart-Young): what is left is the residual's singular values
    # beyond the first r. float32 SVD of a 128×352 matrix: ~1e-6 relative; 1e-4 leaves room for
    # the sum of 124 squared values and B's division by the scaling.
    left = torch.linalg.svdvals(residual)[4:].square().sum().sqrt()
    assert torch.allclose((residual - delta).norm(), left, rtol=1e-4)
    assert left < residual.norm()
