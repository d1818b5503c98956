"""Fine-tuning throughput: the course recipe against ours, in one process, on the same examples.

    .venv/bin/python bench/train_throughput.py            # 5 rounds, ~5 min on 2 quiet cores
    .venv/bin/python bench/train_throughput.py --quick    # one round, ~1.5 min
    .venv/bin/python bench/train_throughput.py --padded   # also time padded micro-batches

Both sides train a randomly initialised GPT-2 124M (the real architecture and 50,257-token
vocabulary; nothing is downloaded) with the Hugging Face Trainer, 16 examples per optimizer step
as batch 4 x gradient accumulation 4, AdamW, fp32:

- course: ``Input: ...\\nOutput: ...`` text, ``padding="max_length"`` at 256 tokens,
  DataCollatorForLanguageModeling, logits and loss at every position;
- ours: remote.jobs.finetune's Trainer and model preparation with its default flags: the Alpaca
  prompt, examples packed end to end with attention kept within each, lm_head only where the
  loss is and fused with it, GELU in one kernel, fused AdamW; then the same with LoRA (and,
  with ``--padded``, micro-batches padded to their longest and re-cut for the least padding
  instead of packed).

The examples have alpaca-1k's shape: its real lengths when the dataset can be loaded, otherwise
lengths drawn to a mean of about 90 tokens in our format, a third of that prompt. The bench prints
the length statistics, seconds per 16 examples, the ratio, real tokens/s and achieved GFLOP/s
against a measured fp32 matmul peak.

The variants take turns, one optimizer step each on the same 16 examples, round after round, so a
neighbour's load falls on all of them alike. The headline, the last line
``train speedup: X.Yx (lora Z.Zx)``, is the wall-clock ratio (what a user waits for), the median
over rounds of each round's ratio, so one noisy round cannot decide it. The two lines above it
give two stricter figures: the CPU-time ratio (CPU-seconds of all threads; the course's step
leaves a core idle part of the time while ours keeps both busy), and the total-time ratio (all
rounds' seconds summed, so the rounds with long examples, where ours gains least, weigh most).
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.machine import matmul_peak_gflops  # noqa: E402

COURSE_MAX_LENGTH = 256  # the course pads every example to this
BATCH, ACCUM = 4, 4  # the course's batch and accumulation: 16 examples a step
LORA_RANK = 16
VARIANTS = [  # ours: (name, remote.jobs.finetune flags beyond its defaults, bench flag adding it)
    ("ours", [], None),
    ("ours+lora", ["--lora-rank", str(LORA_RANK)], None),
    ("ours padded", ["--batching", "padded"], "padded"),
    ("ours bf16", ["--precision", "bf16"], "bf16"),
]
TOKENIZER_VOCAB = 8192  # offline BPE size when GPT-2's own tokenizer is not cached
WORDS_TEXT = (  # a fallback vocabulary when no shipped data is present
    "the model reads text one token at a time and learns to predict the next one a decoder "
    "only transformer looks back never forward fine tuning teaches it a format and the end "
    "token teaches it to stop write explain list three ways describe how why what which give "
    "an example of a short story about water energy city history science music people time "
    "data system question answer simple important because however therefore following"
)


def word_source() -> list[str]:
    """English-ish words: the shipped data when present, else the list above."""
    data = ROOT / "remote" / "jobs" / "data"
    text = " ".join(p.read_text(encoding="utf-8") for p in sorted(data.glob("*.jsonl")))
    words = [w for w in text.replace('"', " ").replace("\\n", " ").split() if w.isalpha()]
    return words if len(words) > 500 else WORDS_TEXT.split() * 20


def load_tokenizer(words: list[str]):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained("gpt2", local_files_only=True), "gpt2"
    except OSError:
        from remote.jobs import prompts
        from remote.jobs.tokenizer import train_bpe

        # The prompt's own words go in too, so they come out about a token a word, as in GPT-2.
        fixed = " ".join(
            (
                prompts.PREAMBLE,
                prompts.PREAMBLE_WITH_INPUT,
                prompts.RESPONSE_HEADER,
                prompts.INSTRUCTION_HEADER,
                prompts.INPUT_HEADER,
                "Input: Output:",
            )
        )
        texts = [" ".join(words[i : i + 200]) + "\n\n" + fixed for i in range(0, len(words), 200)]
        return train_bpe(texts, vocab_size=TOKENIZER_VOCAB, min_frequency=1), "offline BPE"


def hub_reachable(timeout: float = 2.0) -> bool:
    """A quick look before asking the Hub: offline, its client retries for ~40 s first."""
    import os
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def real_alpaca_lengths() -> list[dict[str, str]] | None:
    if not hub_reachable():
        return None
    try:
        from remote.jobs.dataset import load_rows

        return load_rows("alpaca-1k").rows
    except Exception:
        return None


def synthetic_rows(n: int, tok, words: list[str], seed: int) -> list[dict[str, str]]:
    """Rows whose token counts follow alpaca-1k's: short instructions, an input a third of the
    time, answers with a long tail (gamma-distributed)."""
    rng = random.Random(seed)
    cost = {w: len(tok(" " + w, add_special_tokens=False)["input_ids"]) for w in set(words)}

    def text(tokens: int) -> str:
        out, used = [], 0
        while used < tokens:
            w = rng.choice(words)
            out.append(w)
            used += cost[w]
        return " ".join(out)

    rows = []
    for _ in range(n):
        answer = max(2, min(400, int(rng.gammavariate(1.5, 33))))
        rows.append(
            {
                "instruction": text(rng.randint(3, 10)).capitalize() + ".",
                "input": text(rng.randint(3, 12)) if rng.random() < 0.25 else "",
                "output": text(answer).capitalize() + ".",
            }
        )
    return rows


def length_stats(name: str, lengths: list[int], extra: str = "") -> None:
    q = sorted(lengths)
    print(
        f"  {name:<22} mean {statistics.mean(q):6.1f}  median {q[len(q) // 2]:4d}  "
        f"p90 {q[int(len(q) * 0.9)]:4d}  max {q[-1]:4d}  {extra}"
    )


def train_flops(cfg, seqs: list[int], logit_positions: int, lora: bool) -> float:
    """FLOPs one pass over ``seqs`` (computed lengths, padding included) costs: matmuls of the
    blocks (6 per weight per token; 4 with frozen weights), attention scores, and lm_head."""
    h, layers, v = cfg.n_embd, cfg.n_layer, cfg.vocab_size
    body = 12 * layers * h * h
    per_weight = 4 if lora else 6
    tokens = sum(seqs)
    attention = sum(12 * layers * h * t * t for t in seqs)
    head = logit_positions * 2 * h * v * (2 if lora else 3)
    return per_weight * body * tokens + attention + head


class StepTimer:
    """Wall and CPU time (all of this process's threads) of each optimizer step."""

    def __init__(self):
        from transformers import TrainerCallback

        timer = self

        class _CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                timer.t0 = (time.perf_counter(), time.process_time())

            def on_step_end(self, args, state, control, **kw):
                wall, cpu = time.perf_counter(), time.process_time()
                timer.steps.append((wall - timer.t0[0], cpu - timer.t0[1]))

        self.steps: list[tuple[float, float]] = []
        self.t0 = (0.0, 0.0)
        self.callback = _CB()


def course_texts(rows) -> list[str]:
    return [
        f"Input: {r['instruction']} {r['input']}".rstrip() + f"\nOutput: {r['output']}"
        for r in rows
    ]


def course_step(model, tok, rows, out: Path) -> tuple[float, dict]:
    """One optimizer step of the course recipe on ``rows`` (16 examples)."""
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    enc = tok(course_texts(rows), padding="max_length", truncation=True,
              max_length=COURSE_MAX_LENGTH)  # fmt: skip
    targs = TrainingArguments(
        output_dir=str(out / "course"),
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=ACCUM,
        max_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        logging_strategy="no",
        seed=0,
    )
    timer = StepTimer()
    trainer = Trainer(
        model=model,
        args=targs,
        train_dataset=Dataset.from_dict(dict(enc)),
        data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
        callbacks=[timer.callback],
    )
    trainer.remove_callback(PrinterCallback)  # its end-of-train dict on every step
    trainer.train()
    seqs = [COURSE_MAX_LENGTH] * len(rows)
    real = sum(sum(m) for m in enc["attention_mask"])
    return timer.steps[0], {"real_tokens": real, "seqs": seqs, "logits": sum(seqs)}


def ours_args(flags: list[str]):
    """remote.jobs.finetune's own flags for a variant: its defaults plus ``flags``."""
    from remote.jobs import finetune

    return finetune.parse_args(["--max-steps", "1", "--device", "cpu", *flags])


def ours_step(model, tok, rows, out: Path, args) -> tuple[float, dict]:
    """One optimizer step of remote.jobs.finetune's Trainer on the same 16 examples, the model
    prepared by finetune.prepare_model as a real run's is."""
    from transformers.trainer_callback import PrinterCallback

    from remote.jobs import finetune
    from remote.jobs.dataset import format_instruction
    from remote.jobs.sft_batches import tokenize_examples

    pairs = [format_instruction(r, tok.eos_token) for r in rows]
    feats, _ = tokenize_examples(tok, pairs, finetune.MAX_LENGTH)
    targs = finetune.training_arguments(args, out / "ours", finetune.schedule(args, 16, 1), "cpu")
    targs = dataclasses.replace(
        targs,
        eval_strategy="no",
        save_strategy="no",
        disable_tqdm=True,
        logging_strategy="no",
        logging_first_step=False,
    )
    timer = StepTimer()
    packing = args.batching == "packed"
    trainer = finetune.make_trainer(
        model, tok, feats, [], targs, packing=packing, callbacks=[timer.callback]
    )
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    info = {
        "real_tokens": sum(len(f["input_ids"]) for f in feats),
        "seqs": computed_lengths(trainer, feats, packing),
        "logits": sum(sum(x != -100 for x in f["labels"][1:]) for f in feats),
    }
    return timer.steps[0], info


def computed_lengths(trainer, feats, packing: bool) -> list[int]:
    """Each example's length as computed: its own when packed (attention stays within it),
    its micro-batch's longest when padded."""
    if packing:
        return [len(f["input_ids"]) for f in feats]
    return [length for rows, length in trainer.shapes for _ in range(rows)]


def make_rows(n: int, seed: int):
    words = word_source()
    tok, tok_name = load_tokenizer(words)
    tok.pad_token = tok.eos_token
    real = real_alpaca_lengths()
    if real and len(real) >= n:
        return tok, real[:n], "alpaca-1k (real)"
    return tok, synthetic_rows(n, tok, words, seed), f"synthetic, alpaca-1k-shaped ({tok_name})"


def print_lengths(tok, rows) -> None:
    from remote.jobs.dataset import format_instruction
    from remote.jobs.sft_batches import tokenize_examples

    feats, _ = tokenize_examples(tok, [format_instruction(r, tok.eos_token) for r in rows], 512)
    ours = [len(f["input_ids"]) for f in feats]
    prompt = sum(sum(x == -100 for x in f["labels"]) for f in feats)
    length_stats("ours (Alpaca format)", ours, f"prompt share {prompt / sum(ours):.0%}")
    course = [sum(m) for m in tok(course_texts(rows), truncation=True,
                                  max_length=COURSE_MAX_LENGTH)["attention_mask"]]  # fmt: skip
    pad = 1 - sum(course) / (COURSE_MAX_LENGTH * len(rows))
    length_stats("course (Input/Output)", course, f"padded to {COURSE_MAX_LENGTH}: {pad:.0%} pad")


def ratios(times: dict[str, list[tuple[float, float]]], name: str, which: int) -> list[float]:
    """Course / ``name`` per round, by wall clock (``which`` 0) or CPU time (1)."""
    return [c[which] / o[which] for c, o in zip(times["course"], times[name], strict=True)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (the median counts)")
    p.add_argument("--quick", action="store_true", help="a single round")
    p.add_argument("--padded", action="store_true", help="also time padded micro-batches")
    p.add_argument("--bf16", action="store_true", help="also time ours in mixed bf16")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rounds = 1 if args.quick else args.rounds

    import os

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    from remote.jobs.finetune import prepare_model

    torch.set_num_threads(len(os.sched_getaffinity(0)))  # every core this process may use
    hf_logging.set_verbosity_error()
    per_step = BATCH * ACCUM
    tok, rows, source = make_rows(per_step * rounds, args.seed)
    print(f"examples: {len(rows)} ({source}); torch threads {torch.get_num_threads()}")
    print_lengths(tok, rows)
    cfg = GPT2Config()  # GPT-2 124M: 12 layers, 768 wide, 50,257 tokens, 1,024 positions
    torch.manual_seed(args.seed)
    init = GPT2LMHeadModel(cfg).state_dict()

    def fresh():
        model = GPT2LMHeadModel(cfg)
        model.load_state_dict(init)
        return model

    peak = matmul_peak_gflops()
    print(f"fp32 matmul peak: {peak:.1f} GFLOP/s")
    peaks = {n: peak for n, _, _ in [("course", [], None), *VARIANTS]}
    if args.bf16:
        peaks["ours bf16"] = matmul_peak_gflops(dtype="bfloat16")
        print(f"bf16 matmul peak: {peaks['ours bf16']:.1f} GFLOP/s (for ours bf16)")
    flags = {n: ours_args(f) for n, f, opt in VARIANTS if opt is None or getattr(args, opt)}
    names = ["course", *flags]
    models = {"course": fresh(), **{n: prepare_model(fresh(), a) for n, a in flags.items()}}
    times: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    infos: dict[str, list[dict]] = {n: [] for n in names}
    # Interleaved: every variant takes one step on the same 16 examples, round after round,
    # so a neighbour's load on this shared machine falls on all of them alike.
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            batch = rows[r * per_step : (r + 1) * per_step]
            for name in names:
                if name == "course":
                    t, info = course_step(models[name], tok, batch, Path(tmp))
                else:
                    t, info = ours_step(models[name], tok, batch, Path(tmp), flags[name])
                times[name].append(t)
                infos[name].append(info)
            print(
                f"round {r + 1} (wall/cpu s): "
                + ", ".join(f"{n} {times[n][-1][0]:.1f}/{times[n][-1][1]:.1f}" for n in names)
            )
    lora = {n for n, a in flags.items() if a.lora_rank}
    report(cfg, peaks, names, times, infos, torch.get_num_threads(), lora)
    return 0


def report(cfg, peaks: dict, names: list[str], times, infos, threads: int, lora: set) -> None:
    """Per variant its median round; then the CPU-time and (last) the wall-clock ratios."""
    print("median over rounds, seconds per 16 examples (wall; CPU-seconds of all threads):")
    for n in names:
        walls = [w for w, _ in times[n]]
        r = sorted(range(len(walls)), key=walls.__getitem__)[len(walls) // 2]  # the median round
        (wall, cpu), info = times[n][r], infos[n][r]
        flops = train_flops(cfg, info["seqs"], info["logits"], lora=n in lora)
        print(
            f"  {n:<13} wall {wall:6.2f} s  {statistics.median(ratios(times, n, 0)):4.1f}x  "
            f"{info['real_tokens'] / wall:6.0f} real tokens/s  {flops / wall / 1e9:6.1f} GFLOP/s "
            f"({flops / wall / 1e9 / peaks[n]:.0%} of peak)  cpu {cpu:6.1f} s ({cpu / threads:.2f} "
            f"s a thread)"
        )
    full, lora = (statistics.median(ratios(times, n, 1)) for n in ("ours", "ours+lora"))
    print(
        f"cpu-time speedup: {full:.1f}x (lora {lora:.1f}x): the stricter figure; the course's "
        "step keeps only part of the cores busy (memory-bound logits over 4x256x50,257)"
    )
    full, lora = (total_ratio(times, n) for n in ("ours", "ours+lora"))
    print(
        f"total-time speedup: {full:.1f}x (lora {lora:.1f}x): all rounds' seconds summed, so the "
        "rounds of long examples weigh most"
    )
    full, lora = (statistics.median(ratios(times, n, 0)) for n in ("ours", "ours+lora"))
    print(f"train speedup: {full:.1f}x (lora {lora:.1f}x)")


def total_ratio(times: dict[str, list[tuple[float, float]]], name: str) -> float:
    """Course / ``name`` over all rounds' wall time: the mean seconds per 16 examples."""
    return sum(w for w, _ in times["course"]) / sum(w for w, _ in times[name])


if __name__ == "__main__":
    sys.exit(main())
