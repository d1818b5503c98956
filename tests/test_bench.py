"""The benches' own bookkeeping, cheaply: their figures come from hooks and counts that the
code they measure can silently stop feeding (a method renamed, a layer called another way), and
a profile that times nothing still prints a table."""

from __future__ import annotations


def test_serve_profile_times_every_phase_of_a_real_engine(tiny_model_dir):
    from bench.serve_profile import profile_engine, table

    prof = profile_engine(str(tiny_model_dir), ["Hello there", "A model reads"], 6, 5)
    assert prof.steps > 0 and prof.tokens > 0
    for phase in ("prefill", "attn_matmul", "mlp_matmul", "attention", "lm_head", "sampling"):
        assert prof.seconds.get(phase, 0.0) > 0, f"the profile's {phase} hook never ran"
    text = table([prof], [prof.tokens / prof.wall])
    assert "| lm_head" in text and "**one step over HTTP**" in text


def test_train_flops_count_the_tokens_and_spans_computed():
    from transformers import GPT2Config

    from bench.train_throughput import train_flops

    cfg = GPT2Config(n_layer=2, n_embd=8, vocab_size=10)
    h, layers, v = 8, 2, 10
    plain = train_flops(cfg, [(5, 5), (4, 4)], logit_positions=3, lora=False)
    body, attention, head = 12 * layers * h * h * 9, 4 * layers * h * (25 + 16), 3 * 2 * h * v
    assert plain == {
        "forward": 2 * body + attention + head,
        "backward": 4 * body + 2 * attention + 2 * head,
    }
    # The same two examples with their first 2 tokens shared: fewer tokens, longer key spans.
    shared = train_flops(cfg, [(2, 2), (3, 5), (2, 4)], logit_positions=3, lora=False)
    assert shared["forward"] < plain["forward"] and shared["backward"] < plain["backward"]
    lora = train_flops(cfg, [(5, 5), (4, 4)], logit_positions=3, lora=True)
    assert lora["forward"] == plain["forward"] and lora["backward"] < plain["backward"]
