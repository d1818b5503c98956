"""memory.py: the estimate adds up the right parts, and a run that cannot fit stops before
loading anything, with the numbers and what to change."""

import functools

import pytest

from remote.jobs import memory
from remote.jobs.memory import GIB, MemoryEstimateError, ModelShape, estimate


@functools.cache
def gpt2_124m() -> ModelShape:
    from transformers import GPT2Config

    return memory.shape_of(GPT2Config())


def test_shape_counts_gpt2_parameters_without_allocating():
    shape = gpt2_124m()
    assert 124_000_000 < shape.n_params < 125_000_000
    assert (shape.n_layer, shape.n_embd, shape.vocab_size) == (12, 768, 50257)


def test_estimate_parts_follow_the_settings():
    shape = gpt2_124m()
    adam = estimate(shape, batch_size=4, seq_len=256, optimizer="adamw")
    sgd = estimate(shape, batch_size=4, seq_len=256, optimizer="sgd")
    mom = estimate(shape, batch_size=4, seq_len=256, optimizer="sgd-momentum")
    lora = estimate(shape, batch_size=4, seq_len=256, lora_rank=8)
    assert adam.weights == shape.n_params * 4 == adam.gradients
    assert adam.optimizer == 2 * mom.optimizer and sgd.optimizer == 0
    assert lora.trainable < shape.n_params / 100 and lora.total < adam.total
    long = estimate(shape, batch_size=4, seq_len=512)
    assert long.activations > 2 * adam.activations  # attention grows with length squared
    few_logits = estimate(shape, batch_size=4, seq_len=256, loss_tokens=100)
    assert few_logits.logits == 100 * 50257 * 4 * memory.LOGIT_COPIES
    assert 1.5 * GIB < adam.total < 6 * GIB  # a 124M AdamW fine-tune: a few GiB, as measured


def test_check_raises_with_numbers_and_remedies():
    shape = gpt2_124m()
    est = estimate(shape, batch_size=8, seq_len=512, optimizer="adamw")
    memory.check(shape, est, est.total + 1, "available RAM")  # fits: no error
    budget = estimate(shape, batch_size=2, seq_len=512).total + 1
    with pytest.raises(MemoryEstimateError) as err:
        memory.check(shape, est, budget, "available RAM", grad_accum=2)
    msg = str(err.value)
    assert f"{est.total / GIB:.2f} GiB" in msg and f"{budget / GIB:.2f} GiB" in msg
    assert "--batch-size 2 --grad-accum 8" in msg and "--max-length 128" in msg
    assert "m5.xlarge" in msg
    with pytest.raises(MemoryEstimateError, match="together"):  # only a combination fits
        memory.check(shape, est, int(1.8 * GIB), "available RAM")


def test_available_reads_this_machine_or_the_limit():
    free, source = memory.available("cpu")
    assert free > 0 and source == "available RAM"
    half, source = memory.available("cpu", procs=2)
    assert 0 < half <= free
    assert memory.available("cpu", limit_gib=2) == (2 * GIB, "--memory-limit-gb 2")
    assert memory.peak_bytes("cpu") > 10 * 2**20
