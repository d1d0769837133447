"""Generation samples the model as trained, for every method (peftcli/methods/generation.py).

The reference is the definition: each new token is the argmax of the forward pass training uses,
on one prompt at a time (no padding, no cache). Prompt learning's adapters are used as PEFT
initialises them: random virtual tokens or prefixes already change the answers."""

from __future__ import annotations

import peft
import pytest
import torch
import transformers

from peftcli.methods.generation import generate, trained_forward_only
from peftcli.model import builtin

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["Translate to French: cat", "Hi", "the dog is here now", "Hi!"]


def wrapped(model_name: str, config: peft.PeftConfig, seed: int = 0):
    path = builtin.resolve(f"builtin:{model_name}")
    tok = transformers.AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:  # GPT-2: padding with end-of-text, as peftcli's data stage does
        tok.pad_token = tok.eos_token
    auto = (
        transformers.AutoModelForSeq2SeqLM if model_name == "tiny-t5" else transformers.AutoModelForCausalLM
    )
    torch.manual_seed(seed)
    return tok, peft.get_peft_model(auto.from_pretrained(path), config).eval()


def stops(model) -> list[int]:
    eos = model.generation_config.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos)


@torch.no_grad()
def reference(model, ids: list[int], n: int, encoder_decoder: bool = False) -> list[int]:
    """Greedy decoding by whole forward passes, one unpadded prompt."""
    prompt = torch.tensor([ids])
    seq = torch.tensor([[model.config.decoder_start_token_id]]) if encoder_decoder else prompt
    new: list[int] = []
    for _ in range(n):
        if encoder_decoder:
            logits = model(
                input_ids=prompt, attention_mask=torch.ones_like(prompt), decoder_input_ids=seq
            ).logits
        else:
            logits = model(input_ids=seq, attention_mask=torch.ones_like(seq)).logits
        token = int(logits[0, -1].argmax())
        new.append(token)
        seq = torch.cat([seq, torch.tensor([[token]])], dim=1)
        if token in stops(model):
            break
    return new


def left_padded(tok, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    enc = [tok(p).input_ids for p in prompts]
    n, pad = max(map(len, enc)), tok.pad_token_id
    ids = torch.tensor([[pad] * (n - len(e)) + e for e in enc])
    mask = torch.tensor([[0] * (n - len(e)) + [1] * len(e) for e in enc])
    return ids, mask


PROMPT_LEARNING = {
    "prefix": lambda task: peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=4),
    "prompt": lambda task: peft.PromptTuningConfig(task_type=task, num_virtual_tokens=4),
    "p-tuning": lambda task: peft.PromptEncoderConfig(
        task_type=task, num_virtual_tokens=4, encoder_hidden_size=32
    ),
}


@pytest.mark.parametrize("model_name", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("kind", sorted(PROMPT_LEARNING))
def test_prompt_learning_generates_what_its_forward_pass_predicts(model_name, kind):
    tok, model = wrapped(model_name, PROMPT_LEARNING[kind]("CAUSAL_LM"))
    assert trained_forward_only(model)
    ids, mask = left_padded(tok, PROMPTS)
    out = generate(model, ids, mask, 8, tok.pad_token_id)
    assert torch.equal(out[:, : ids.shape[1]], ids)  # prompt + continuation, as HF generate returns
    for i, text in enumerate(PROMPTS):
        want = reference(model, tok(text).input_ids, 8)
        got = out[i, ids.shape[1] :].tolist()
        assert got[: len(want)] == want, (kind, text)
        assert all(t == tok.pad_token_id for t in got[len(want) :])  # after its stop: padding


def test_prefix_tuning_on_t5_generates_what_its_forward_pass_predicts():
    tok, model = wrapped("tiny-t5", PROMPT_LEARNING["prefix"]("SEQ_2_SEQ_LM"))
    tok.padding_side = "right"
    batch = tok(PROMPTS[:2], return_tensors="pt", padding=True)
    out = generate(model, batch.input_ids, batch.attention_mask, 6, tok.pad_token_id)
    for i, text in enumerate(PROMPTS[:2]):
        want = reference(model, tok(text).input_ids, 6, encoder_decoder=True)
        assert out[i, 0] == model.config.decoder_start_token_id  # generate's decoder ids
        assert out[i, 1 : 1 + len(want)].tolist() == want


def test_the_adapter_disabled_generates_as_the_base():
    tok, model = wrapped("tiny-llama", PROMPT_LEARNING["prefix"]("CAUSAL_LM"))
    ids, mask = left_padded(tok, PROMPTS)
    with model.disable_adapter():
        assert not trained_forward_only(model)
        ours = generate(model, ids, mask, 6, tok.pad_token_id)
    base = model.get_base_model().generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id
    )
    assert torch.equal(ours, base)


def test_weight_methods_use_hf_generate_unchanged():
    tok, model = wrapped("tiny-llama", peft.LoraConfig(task_type="CAUSAL_LM", r=4, init_lora_weights=False))
    assert not trained_forward_only(model)
    ids, mask = left_padded(tok, PROMPTS)
    ours = generate(model, ids, mask, 6, tok.pad_token_id)
    hf = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id
    )
    assert torch.equal(ours, hf)


def test_sampling_without_cache_follows_the_seed():
    """Sampled decoding (generate --temperature) is reproducible from the seed and differs from greedy."""
    tok, model = wrapped("tiny-llama", PROMPT_LEARNING["prompt"]("CAUSAL_LM"))
    ids, mask = left_padded(tok, PROMPTS[:1])
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        runs.append(generate(model, ids, mask, 12, tok.pad_token_id, do_sample=True, temperature=2.0))
    assert torch.equal(runs[0], runs[1])
    greedy = generate(model, ids, mask, 12, tok.pad_token_id)
    assert not torch.equal(runs[0], greedy)


def test_eval_and_generate_decode_through_it():
    """`eval`'s exact match and `peftcli generate` (generate_answers) answer as the forward pass."""
    from peftcli.training.evaluate import generate_answers

    tok, model = wrapped("tiny-llama", PROMPT_LEARNING["prefix"]("CAUSAL_LM"))
    prompts = [tok(p).input_ids for p in PROMPTS]
    answers = generate_answers(model, tok, prompts, 8)
    want = [tok.decode(reference(model, p, 8), skip_special_tokens=True) for p in prompts]
    assert answers == want
