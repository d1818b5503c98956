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


def test_train_bench_steps_keep_their_optimizer(tiny_model_dir, tmp_path):
    # Each timed step is a fresh Trainer; the optimizer must carry over, as in a run, so no
    # timed step but the warm-up allocates and zeroes AdamW's moments.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.train_throughput import course_step, ours_args, ours_step
    from remote.jobs.finetune import prepare_model

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.pad_token = tok.eos_token
    rows = [
        {"instruction": f"Name colour number {i}.", "input": "", "output": "Blue and green."}
        for i in range(16)
    ]
    args = ours_args([])
    ours = prepare_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), args)
    course = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for step in (
        lambda state: course_step(course, tok, rows, tmp_path, state),
        lambda state: ours_step(ours, tok, rows, tmp_path, args, 10**4, state),
    ):
        state: dict = {}
        first, _ = step(state)
        optimizer = state["optimizer"]
        second, _ = step(state)
        assert state["optimizer"] is optimizer  # handed to the second Trainer, not remade
        steps = {float(s["step"]) for s in optimizer.state.values()}
        assert steps == {2.0}, steps  # every parameter's moments took both steps
        assert first["wall"] > 0 and second["wall"] > 0
