"""Target modules: keywords, names, regexes and layers resolve the same from a model and from
its checkpoint's weight names; a target that matches nothing names what exists."""

from __future__ import annotations

import pytest

from peftcli.errors import UserError
from peftcli.methods.targets import LinearIndex, resolve_targets
from peftcli.model import builtin


@pytest.fixture(scope="module")
def llama():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(builtin.materialise("tiny-llama"))


@pytest.fixture(scope="module")
def gpt2():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(builtin.materialise("tiny-gpt2"))


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_weights_and_model_give_the_same_inventory(name, llama, gpt2):
    model = llama if name == "tiny-llama" else gpt2
    from_model = LinearIndex.from_model(model)
    from_weights = LinearIndex.from_weights(builtin.materialise(name))
    assert sorted(from_model.names) == from_weights.names
    assert from_model.attention == from_weights.attention
    assert not any("lm_head" in n or "embed" in n for n in from_model.names)


def test_keywords_on_llama(llama):
    index = LinearIndex.from_model(llama)
    assert resolve_targets(index, "all-linear", None)["target_modules"] == [
        "down_proj",
        "gate_proj",
        "k_proj",
        "o_proj",
        "q_proj",
        "up_proj",
        "v_proj",
    ]
    assert resolve_targets(index, "attention", None)["target_modules"] == [
        "k_proj",
        "o_proj",
        "q_proj",
        "v_proj",
    ]
    assert resolve_targets(index, "mlp", None)["target_modules"] == ["down_proj", "gate_proj", "up_proj"]
    assert len(resolve_targets(index, ["attention", "mlp"], None)["names"]) == 4 * 7


def test_keywords_on_gpt2_conv1d(gpt2):
    index = LinearIndex.from_model(gpt2)
    assert resolve_targets(index, "attention", None)["names"] == [
        f"transformer.h.{i}.attn.{m}" for i in range(2) for m in ("c_attn", "c_proj")
    ]
    # c_proj exists in attention and MLP: the short form would over-select, so names are exact.
    mlp = resolve_targets(index, "mlp", None)
    assert mlp["target_modules"] == mlp["names"] and all(".mlp." in n for n in mlp["names"])


def test_layers_restrict_and_count_from_the_end(llama):
    index = LinearIndex.from_model(llama)
    out = resolve_targets(index, ["q_proj", "v_proj"], [-1, 0])
    assert out["target_modules"] == ["q_proj", "v_proj"]
    assert out["layers_to_transform"] == [0, 3] and out["layers_pattern"] == ["layers"]
    assert len(out["names"]) == 4


def test_regex_and_full_names(llama):
    index = LinearIndex.from_model(llama)
    assert len(resolve_targets(index, r".*\.(q|v)_proj", None)["names"]) == 8
    assert resolve_targets(index, ["model.layers.1.mlp.up_proj"], None)["names"] == [
        "model.layers.1.mlp.up_proj"
    ]


@pytest.mark.parametrize(
    ("targets", "layers", "expected"),
    [
        (["q_prj"], None, "(did you mean `q_proj`?)"),
        (["query"], None, "this model has down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"),
        ("lm_head", None, "matches no linear module"),
        ([], None, "empty list"),
        ("all-linear", [4], "out of range; the model has 4 layers"),
    ],
)
def test_bad_targets_name_what_exists(llama, targets, layers, expected):
    with pytest.raises(UserError) as info:
        resolve_targets(LinearIndex.from_model(llama), targets, layers)
    assert expected in str(info.value)


def test_peft_adapts_exactly_the_resolved_modules(llama):
    import copy

    from peftcli.methods.apply import apply_method
    from peftcli.recipe import PeftSection

    section = PeftSection(method="lora", target_modules="mlp", layers=[1, 2])
    model = apply_method(copy.deepcopy(llama), section, "causal_lm")
    adapted = sorted(
        n.removeprefix("base_model.model.").removesuffix(".lora_A.default")
        for n, _ in model.named_modules()
        if n.endswith("lora_A.default")
    )
    expected = resolve_targets(LinearIndex.from_model(llama), "mlp", [1, 2])["names"]
    assert adapted == expected
