"""vocab_loss.py: the in-place cross-entropy and the fused lm_head give exactly the losses and
gradients of F.cross_entropy on lm_head(hidden), and the fused head is used only where a probe
shows it computes what the model does."""

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from remote.jobs.models import add_lora, sparse_tied_embedding
from remote.jobs.packed_attention import use_packed_attention
from remote.jobs.sft_batches import FlattenBatch, PadToLongest, loss_positions, response_loss
from remote.jobs.vocab_loss import (
    FUSED_HEAD,
    head_cross_entropy,
    token_cross_entropy,
    use_fused_head,
)

VOCAB = 97  # not a multiple of 64: the fused logits rows are padded to 128


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=64, bos_token_id=0,
        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return GPT2LMHeadModel(config)  # in training mode, as the Trainer runs it


def micro_batches(packed: bool = False) -> list[dict]:
    collate = FlattenBatch() if packed else PadToLongest(0)
    gen = torch.Generator().manual_seed(1)
    batches = []
    for lengths in ((9, 14, 5), (20, 3)):
        feats = []
        for n in lengths:
            ids = torch.randint(0, VOCAB, (n,), generator=gen).tolist()
            labels = [-100] * (n // 3) + ids[n // 3 :]  # a prompt without loss, then a response
            feats.append({"input_ids": ids, "labels": labels})
        batches.append(collate(feats))
    return batches


def step(model, batches) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """One optimizer step's worth of backward passes, as the Trainer runs them."""
    items = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    model.zero_grad(set_to_none=True)
    losses = []
    for b in batches:
        loss = response_loss(model, b, items)
        loss.backward()
        losses.append(loss.detach())
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return losses, grads


def test_in_place_cross_entropy_matches_torch():
    torch.manual_seed(0)
    h = torch.randn(9, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(40, 16, dtype=torch.float64, requires_grad=True)
    targets, weights = torch.randint(0, 40, (9,)), torch.rand(9, dtype=torch.float64)
    expected = F.cross_entropy(h @ w.t(), targets, reduction="none")
    want = torch.autograd.grad((expected * weights).sum(), (h, w))
    losses = token_cross_entropy(h @ w.t(), targets)
    got = torch.autograd.grad((losses * weights).sum(), (h, w))
    assert torch.allclose(losses, expected, atol=1e-12)
    for a, b in zip(got, want, strict=True):
        assert torch.allclose(a, b, atol=1e-12)


@pytest.mark.parametrize(
    ("sparse", "packed"),
    [(False, False), (True, False), (True, True)],
    ids=["padded", "padded-sparse-embedding", "packed-sparse-embedding"],
)
def test_fused_head_gives_the_losses_and_gradients_of_the_model(sparse, packed):
    # As finetune.prepare_model sets a model up on one process, against the model as it came.
    plain, fused = tiny_gpt2(), tiny_gpt2()
    if packed:
        assert use_packed_attention(plain) and use_packed_attention(fused)
    assert use_fused_head(fused) and getattr(fused, FUSED_HEAD)
    if sparse:
        assert sparse_tied_embedding(fused)
    batches = micro_batches(packed)
    want_losses, want = step(plain, batches)
    got_losses, got = step(fused, batches)
    assert torch.allclose(torch.stack(got_losses), torch.stack(want_losses), atol=1e-6)
    assert got.keys() == want.keys()
    for name in want:  # the tied embedding/lm_head gradient included, dense as before
        assert got[name].layout == torch.strided
        assert torch.allclose(got[name], want[name], atol=1e-6), name


def test_fused_head_is_the_path_taken_and_matches_in_evaluation():
    model = tiny_gpt2()
    batch = micro_batches()[0]
    with torch.no_grad():
        want = response_loss(model, batch, reduction="none")
        assert use_fused_head(model)
        keep, targets = loss_positions(batch["labels"])
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        direct = head_cross_entropy(model, inputs, keep, targets)
        got = response_loss(model, batch, reduction="none")
    assert direct is not None and torch.allclose(direct, want, atol=1e-6)
    assert torch.allclose(got, want, atol=1e-6)


def test_fused_head_under_lora_trains_the_adapters_alike():
    plain, fused = tiny_gpt2(), tiny_gpt2()
    assert use_fused_head(fused)
    plain, fused = add_lora(plain, 4, 8), add_lora(fused, 4, 8)
    for a, b in zip(plain.parameters(), fused.parameters(), strict=True):
        b.data.copy_(a.data)  # same adapter initialisation
    batches = micro_batches()
    want_losses, want = step(plain, batches)
    got_losses, got = step(fused, batches)
    assert torch.allclose(torch.stack(got_losses), torch.stack(want_losses), atol=1e-6)
    assert got.keys() == want.keys() and all("lora" in n for n in got)
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-6), name


def test_fused_head_stands_aside_under_autocast():
    model = tiny_gpt2()
    assert use_fused_head(model)
    batch = micro_batches()[0]
    keep = torch.ones_like(batch["labels"], dtype=torch.bool)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        assert head_cross_entropy(model, inputs, keep, batch["labels"][keep]) is None
        assert response_loss(model, batch).dtype == torch.float32  # the model's own head


def test_fused_head_only_where_the_probe_agrees():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    # Gemma 2 soft-caps its logits after lm_head: the hidden state times the weight is not
    # what the model outputs, so it keeps its own forward.
    config = Gemma2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=0.5,
    )  # fmt: skip
    assert use_fused_head(Gemma2ForCausalLM(config)) is False
    biased = tiny_gpt2()
    biased.lm_head = torch.nn.Linear(32, VOCAB, bias=True)
    assert use_fused_head(biased) is False
    model = tiny_gpt2()
    was = model.training
    use_fused_head(model)
    assert model.training == was  # the probe leaves the mode as it found it


def test_a_new_step_reuses_the_last_gradient_matrix_only_when_nobody_holds_it():
    plain, fused = tiny_gpt2(), tiny_gpt2()
    assert use_fused_head(fused) and sparse_tied_embedding(fused)
    first, second = micro_batches(), micro_batches(packed=False)[::-1]
    weight = fused.lm_head.weight
    step(fused, first)  # zero_grad(set_to_none=True) first, as the Trainer does every step
    where = weight.grad.data_ptr()
    _, got = step(fused, second)
    assert weight.grad.data_ptr() == where  # the same memory, not a fresh matrix
    _, want = step(plain, second)
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-6), name
    held = weight.grad  # someone keeps last step's gradient: it must stay as it was
    kept = held.clone()
    step(fused, first)
    assert weight.grad.data_ptr() != held.data_ptr()
    assert torch.equal(held, kept)


@pytest.mark.parametrize(
    ("flags", "world", "fused"),
    [(["--precision", "fp32"], "1", True), (["--precision", "bf16"], "1", False),
     (["--precision", "fp32"], "2", False)],
    ids=["fp32", "mixed-bf16", "ddp"],
)  # fmt: skip
def test_finetune_fuses_the_head_for_fp32_on_one_process_only(flags, world, fused, monkeypatch):
    # Mixed precision autocasts inside the model's forward (accelerate wraps it), which the
    # fused head goes around: it would silently train in fp32. DDP never sees .grad written.
    from remote.jobs.finetune import parse_args, prepare_model

    monkeypatch.setenv("WORLD_SIZE", world)
    model = prepare_model(tiny_gpt2(), parse_args(["--device", "cpu", *flags]))
    assert getattr(model, FUSED_HEAD, False) is fused
