"""The `bottleneck` tuner (peftcli's Houlsby adapters) on the builtin tiny models, through PEFT's
own get_peft_model / save_pretrained / PeftModel.from_pretrained."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import peftcli.methods.tuners  # noqa: F401  registers peftcli's own tuners with PEFT
from peftcli.methods.tuners.bottleneck import BottleneckConfig, BottleneckLayer

# Houlsby placement: attention-output and FFN-output projections.
TINY_MODELS = {
    "tiny-llama": ["o_proj", "down_proj"],
    "tiny-gpt2": ["attn.c_proj", "mlp.c_proj"],
}
M = 8

# Run in a fresh process: only PEFT, transformers and the registration import.
RELOAD = """
import sys, torch
import peftcli.methods.tuners
from peft import PeftModel
from transformers import AutoModelForCausalLM
base_path, adapter, ids_path, out = sys.argv[1:]
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), adapter).eval()
with torch.no_grad():
    torch.save(model(input_ids=torch.load(ids_path)).logits, out)
"""


@pytest.fixture(scope="module")
def model_paths():
    from peftcli.model.builtin import materialise

    return {name: materialise(name) for name in TINY_MODELS}


def load_base(path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(path).eval()


def wrap(base, targets, **overrides):
    from peft import get_peft_model

    kwargs = {"target_modules": targets, "bottleneck_size": M, "task_type": "CAUSAL_LM", **overrides}
    return get_peft_model(base, BottleneckConfig(**kwargs))


def batch(model, seed=0, shape=(4, 24)):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, shape, generator=g)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def train(model, ids, steps=8):
    """A few AdamW steps on one fixed batch; returns eval-mode losses before and after."""

    def eval_loss():
        model.eval()
        with torch.no_grad():
            return model(input_ids=ids, labels=ids).loss.item()

    before = eval_loss()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return before, eval_loss()


@pytest.mark.parametrize("name", TINY_MODELS)
def test_fresh_wrap_equals_base_and_counts_params(model_paths, name):
    from transformers.pytorch_utils import Conv1D

    base = load_base(model_paths[name])
    ids = batch(base)
    ref = logits(base, ids)
    expected = {
        key: (mod.out_features if isinstance(mod, torch.nn.Linear) else mod.weight.shape[1])
        for key, mod in base.named_modules()
        if any(key.endswith("." + t) for t in TINY_MODELS[name])
    }
    assert expected and len(expected) == 2 * base.config.num_hidden_layers

    model = wrap(base, TINY_MODELS[name])

    assert sorted(model.targeted_module_names) == sorted(expected)
    layers = {
        k.removeprefix("base_model.model."): m
        for k, m in model.named_modules()
        if isinstance(m, BottleneckLayer)
    }
    assert sorted(layers) == sorted(expected)
    if name == "tiny-gpt2":
        # only the projections back to the residual stream, not c_attn / c_fc
        assert all(isinstance(m.get_base_layer(), Conv1D) for m in layers.values())
    assert torch.equal(logits(model, ids), ref), "zero-initialised up-projection must leave outputs unchanged"

    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in trainable.values()) == sum(2 * d * M + M + d for d in expected.values())
    assert model.get_nb_trainable_parameters()[0] == sum(p.numel() for p in trainable.values())
    assert all((".bottleneck_down." in n or ".bottleneck_up." in n) for n in trainable)
    assert len(trainable) == 4 * len(expected)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_train_save_reload_in_fresh_process(model_paths, name, tmp_path):
    base = load_base(model_paths[name])
    ids = batch(base)
    ref = logits(base, ids)
    model = wrap(base, TINY_MODELS[name])

    before, after = train(model, ids)
    assert after < before - 0.05, (before, after)
    model.eval()
    trained = logits(model, ids)
    # Changed: the loss fell by > 0.05 just above, which moves logits by far more than 1e-4
    # (~4 measured); float32 rounding alone moves them by ~1e-6.
    assert not torch.allclose(trained, ref, atol=1e-4)

    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "BOTTLENECK"
    assert config["bottleneck_size"] == M
    weights = adapter / "adapter_model.safetensors"
    assert weights.is_file() and not (adapter / "adapter_model.bin").exists()
    from safetensors.torch import load_file

    saved = load_file(weights)
    assert saved and all(".bottleneck_down." in k or ".bottleneck_up." in k for k in saved)

    torch.save(ids, tmp_path / "ids.pt")
    out = tmp_path / "logits.pt"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            RELOAD,
            str(model_paths[name]),
            str(adapter),
            str(tmp_path / "ids.pt"),
            str(out),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    # The same float32 weights, input and kernels in another process: equal up to a kernel
    # summing in another order (logits |z| < 5: ~1e-6; 0 measured); 1e-5 is margin.
    torch.testing.assert_close(torch.load(out), trained, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_disable_adapter_gives_base_and_merge_refuses(model_paths, name):
    base = load_base(model_paths[name])
    ids = batch(base)
    ref = logits(base, ids)
    model = wrap(base, TINY_MODELS[name])
    # a non-zero adapter, so that "disabled" is distinguishable from "fresh"
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
    adapted = logits(model, ids)
    # Changed: adapter weights of std 0.5 move logits by O(1) (~5 measured), rounding by ~1e-6.
    assert not torch.allclose(adapted, ref, atol=1e-4)

    with model.disable_adapter():
        assert torch.equal(logits(model, ids), ref)
    assert torch.equal(logits(model, ids), adapted)

    with pytest.raises(ValueError, match="cannot be merged.*adapter attached"):
        model.merge_and_unload()
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_adapter()
    # a refused merge leaves the model as it was
    assert torch.equal(logits(model, ids), adapted)
    assert torch.equal(logits(model.unload(), ids), ref)


def test_named_adapters_switch(model_paths):
    base = load_base(model_paths["tiny-llama"])
    ids = batch(base)
    ref = logits(base, ids)
    model = wrap(base, TINY_MODELS["tiny-llama"])
    model.add_adapter(
        "second", BottleneckConfig(target_modules=["o_proj"], bottleneck_size=4, non_linearity="tanh")
    )
    # the added adapter is inactive and frozen; the default stays the one being trained
    assert all("second" not in n for n, p in model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".second." in n:
                p.normal_(0, 0.5)
    assert torch.equal(logits(model, ids), ref)
    model.set_adapter("second")
    assert model.active_adapter == "second"
    # Changed: adapter weights of std 0.5 move logits by O(1) (~5 measured), rounding by ~1e-6.
    assert not torch.allclose(logits(model, ids), ref, atol=1e-4)
    assert all(".second." in n for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"bottleneck_size": 0}, "bottleneck_size"),
        ({"bottleneck_size": 2.5}, "bottleneck_size"),
        ({"non_linearity": "swish"}, "non_linearity"),
        ({"dropout": 1.0}, "dropout"),
        ({"placement": "parallel"}, "placement"),
        ({"layers_pattern": "layers"}, "layers_pattern"),
    ],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        BottleneckConfig(target_modules=["o_proj"], **kwargs)


def test_registration_is_idempotent():
    from peft import PeftType
    from peft.mapping import (
        PEFT_TYPE_TO_CONFIG_MAPPING,
        PEFT_TYPE_TO_PREFIX_MAPPING,
        PEFT_TYPE_TO_TUNER_MAPPING,
    )

    from peftcli.methods.tuners import bottleneck

    bottleneck.register()
    bottleneck.register()
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.BOTTLENECK] is BottleneckConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.BOTTLENECK] is bottleneck.BottleneckModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.BOTTLENECK] == "bottleneck_"
    assert BottleneckConfig().peft_type is PeftType("BOTTLENECK")
    assert list(PeftType).count(PeftType.BOTTLENECK) == 1
