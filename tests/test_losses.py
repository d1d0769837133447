"""The causal loss: only supervised positions reach the head, fused with the cross-entropy.

Every shortcut is checked against the plain computation — full logits from the model, then
`F.cross_entropy` with ignored labels — for the loss and for every trainable gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peftcli.model import builtin
from peftcli.training.losses import IGNORE, LinearCrossEntropy, _targets, loss_sum


def plain_loss(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits, labels = _targets(logits, batch["labels"], "causal_lm")
    return F.cross_entropy(
        logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum"
    )


def assert_near(got, want):
    """Float32 noise of a different summation order (~1e-7 relative per term, sums of a few
    hundred terms): 1e-4 of the tensor's norm is margin, a wrong gradient is off by its size."""
    assert (got - want).norm() <= 1e-4 * want.norm() + 1e-8


def grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def batch_for(vocab: int):
    """Two rows of different lengths: a prompt (ignored), an answer (supervised), padding."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (2, 20), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 14:] = 0
    labels = ids.clone()
    labels[:, :8] = IGNORE
    labels[mask == 0] = IGNORE
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def peft_model(name: str, method: str):
    from peft import LoraConfig, PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(builtin.materialise(name))
    if method == "lora":
        config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    else:
        config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5)
    return get_peft_model(model, config).train()


@pytest.mark.parametrize(
    ("name", "method"), [("tiny-llama", "lora"), ("tiny-gpt2", "lora"), ("tiny-llama", "prompt-tuning")]
)
def test_fused_head_loss_and_gradients_equal_the_plain_computation(name, method):
    model = peft_model(name, method)
    head = model.get_output_embeddings()
    batch = batch_for(model.config.vocab_size)
    expected_loss = plain_loss(model, batch)
    expected = grads(model, expected_loss)
    loss = loss_sum(model, batch, "causal_lm")
    assert getattr(head, "_peftcli_plain_logits", True)  # the fused path was taken
    assert "forward" not in vars(head)  # and the head restored
    # float32: the fused head makes the 18 supervised rows' logits in a matmul of another shape
    # (~1e-7 relative each; 7e-8 measured on the summed loss), so 1e-5 is ~100x margin.
    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-5)
    got = grads(model, loss)
    assert got.keys() == expected.keys() and got
    for n in expected:
        assert_near(got[n], expected[n])


def test_a_model_that_changes_its_logits_gets_real_logits():
    """A head output the model scales (as Cohere or Granite do) cannot be fused: the batch is
    redone with real logits, and the head is not fused again."""
    model = peft_model("tiny-llama", "lora")
    inner = model.base_model.model
    original = type(inner).forward

    def scaled(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        out.logits = out.logits * 0.5
        return out

    type(inner).forward = scaled
    try:
        batch = batch_for(model.config.vocab_size)
        expected_loss = plain_loss(model, batch)
        expected = grads(model, expected_loss)
        for _ in range(2):
            loss = loss_sum(model, batch, "causal_lm")
            # float32 real logits, summed the plain way: ~1e-7 relative (0 measured); 1e-5 margin.
            assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-5)
        assert model.get_output_embeddings()._peftcli_plain_logits is False
        for n, g in grads(model, loss).items():
            assert_near(g, expected[n])
    finally:
        type(inner).forward = original


def test_chunked_linear_cross_entropy_is_exact_across_chunks():
    """Several chunks, a trainable weight and bias, float64: equal to the plain loss."""
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(37, 16, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(50, dtype=torch.float64, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (37,), generator=g)
    plain = F.cross_entropy(F.linear(hidden, weight, bias), targets, reduction="sum")
    expected = torch.autograd.grad(plain * 3, (hidden, weight, bias))
    fused = LinearCrossEntropy.apply(hidden, weight, bias, targets, 8)  # 5 chunks
    # float64: 37 log-sum-exps of 50 terms summed in 5 chunks, gradients summed over 37 rows:
    # rounding bounded by ~100 eps = 2e-14 relative (7e-15 measured); 1e-12 leaves 50x, while a
    # lost or doubled row moves the loss by ~1/37.
    assert fused.item() == pytest.approx(plain.item(), rel=1e-12)
    for got, want in zip(torch.autograd.grad(fused * 3, (hidden, weight, bias)), expected, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-12, atol=1e-12)  # float64, as above
    with torch.no_grad():  # evaluation: the loss alone
        assert LinearCrossEntropy.apply(hidden, weight, bias, targets, 8).item() == pytest.approx(
            plain.item(),
            rel=1e-12,  # float64, as above
        )


def test_fused_loss_under_bf16_autocast_matches_the_model_head():
    model = peft_model("tiny-llama", "lora")
    batch = batch_for(model.config.vocab_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = plain_loss(model, batch)
        loss = loss_sum(model, batch, "causal_lm")
    assert loss.dtype == torch.float32
    # bf16 logits (|z| < 4): the fused head's matmul of another shape may round a logit one bf16
    # ulp (<= 2^-7 relative) apart; at worst every token's loss (~6) moves by 2 * 2^-7 * 4, ~1e-2
    # relative of the sum. 2e-2 bounds that on any CPU (0 measured), not one machine's noise.
    assert loss.item() == pytest.approx(expected.item(), rel=2e-2)
    loss.backward()


def test_the_fused_head_chunk_is_sized_from_the_device_memory():
    """A GPU chunk takes 1/8 of the free memory (an 80 GB GPU makes Llama 3's 128k-vocabulary
    logits in chunks of thousands of rows, not 128); a CPU chunk stays within 32 MiB, or 1/64 of
    a small machine's RAM; at least one row always."""
    from peftcli.training.losses import free_memory, fused_rows

    assert fused_rows(128256, "cuda", free=64 * 2**30) == 64 * 2**30 // 8 // (8 * 128256) > 8000
    assert fused_rows(8192, "cpu", free=16 * 2**30) * 8192 * 8 == 32 * 2**20
    assert fused_rows(8192, "cpu", free=2**30) * 8192 * 8 == 2**30 // 64
    assert fused_rows(10**9, "cpu", free=2**20) == 1
    assert free_memory("cpu") > 0 and fused_rows(8192) >= 1


@pytest.mark.gpu
def test_on_a_gpu_the_head_chunk_and_padded_lengths_follow_the_device():
    """On CUDA: chunks from the free memory (more than 2**24 logits on a GPU with 8 GiB free),
    the fused loss unchanged by the chunk size, and batches padded to a multiple of 64."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from peftcli.data.batching import pad_multiple
    from peftcli.training.losses import free_memory, fused_rows

    assert pad_multiple(torch.device("cuda")) == 64
    if free_memory("cuda") >= 8 * 2**30:
        assert fused_rows(128256, "cuda") > 2**24 // 128256
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(300, 32, dtype=torch.float64, generator=g).cuda().requires_grad_()
    weight = torch.randn(1000, 32, dtype=torch.float64, generator=g).cuda()
    targets = torch.randint(0, 1000, (300,), generator=g).cuda()
    one = LinearCrossEntropy.apply(hidden, weight, None, targets, fused_rows(1000, "cuda"))
    many = LinearCrossEntropy.apply(hidden, weight, None, targets, 7)
    # float64, 300 log-sum-exps of 1000 terms in 1 or 43 chunks: ~1e-13 relative at most.
    assert one.item() == pytest.approx(many.item(), rel=1e-12)
