"""models.py: the one-kernel GELU is the same function as GPT-2's gelu_new, and what is saved
still says gelu_new, so every loader builds the model it always did."""

import json

import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
from transformers.activations import GELUTanh, NewGELUActivation

from remote.jobs.models import add_lora, fuse_gelu, load_model, sparse_tied_embedding


def test_fused_gelu_computes_what_gelu_new_does(tmp_path):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=97)).eval()
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        before = model(ids).logits
        assert fuse_gelu(model) == 2  # one per block
        after = model(ids).logits
    assert torch.allclose(before, after, atol=1e-5)
    assert not any(isinstance(m, NewGELUActivation) for m in model.modules())
    x = torch.linspace(-6, 6, 1001, requires_grad=True)
    y_new, y_fused = NewGELUActivation()(x), GELUTanh()(x)
    assert torch.allclose(y_new, y_fused, atol=1e-6)
    (g_new,) = torch.autograd.grad(y_new.sum(), x)
    (g_fused,) = torch.autograd.grad(y_fused.sum(), x)
    assert torch.allclose(g_new, g_fused, atol=1e-5)  # and so is its gradient

    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["activation_function"] == "gelu_new"
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(plain.transformer.h[0].mlp.act, NewGELUActivation)
    assert isinstance(load_model(str(tmp_path)).transformer.h[0].mlp.act, GELUTanh)


def test_sparse_tied_embedding_leaves_the_gradient_as_it_was():
    def grad(sparse: bool) -> torch.Tensor:
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=97))
        if sparse:
            assert sparse_tied_embedding(model)
        ids = torch.randint(0, 97, (3, 10))
        for _ in range(2):  # two micro-batches: the second adds into the first's gradient
            model(ids, labels=ids).loss.backward()
        g = model.transformer.wte.weight.grad
        assert g.layout == torch.strided  # what optimizers and clipping see: dense
        return g

    assert torch.allclose(grad(True), grad(False), atol=1e-6)


def test_sparse_embedding_only_where_it_is_safe():
    shape = {"n_layer": 1, "n_embd": 32, "n_head": 2, "vocab_size": 50}
    untied = GPT2LMHeadModel(GPT2Config(**shape, tie_word_embeddings=False))
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    assert sparse_tied_embedding(untied) is False and not untied.transformer.wte.sparse
    lora = add_lora(GPT2LMHeadModel(GPT2Config(**shape)), 2, 4)  # frozen embedding: no gradient
    assert sparse_tied_embedding(lora) is False
