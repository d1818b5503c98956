"""Fine-tuning throughput: the course recipe against ours, in one process, on the same examples.

    .venv/bin/python bench/train_throughput.py            # 5 rounds, ~5 min on 2 quiet cores
    .venv/bin/python bench/train_throughput.py --quick    # one round, ~1.5 min
    .venv/bin/python bench/train_throughput.py --padded   # also time padded micro-batches
    .venv/bin/python bench/train_throughput.py --unjoined # also time one packed row a micro-batch
    .venv/bin/python bench/train_throughput.py --unshared # also time rows without shared prefixes

Both sides train a randomly initialised GPT-2 124M (the real architecture and 50,257-token
vocabulary; nothing is downloaded) with the Hugging Face Trainer, 16 examples per optimizer step
as batch 4 x gradient accumulation 4, AdamW, fp32:

- course: ``Input: ...\\nOutput: ...`` text, ``padding="max_length"`` at 256 tokens,
  DataCollatorForLanguageModeling, logits and loss at every position;
- ours: remote.jobs.finetune's Trainer and model preparation with its default flags: the Alpaca
  prompt, examples packed end to end with attention kept within each, a step's packed rows
  joined up to the memory plan's tokens, the prompt beginnings the examples share computed once
  a row, lm_head only where the loss is and fused with it, GELU in one kernel, fused AdamW; then
  the same with LoRA (and, with ``--padded``, micro-batches padded to their longest and re-cut
  for the least padding instead of packed; with ``--unjoined``, one packed row per micro-batch;
  with ``--unshared``, every example's prompt computed in full).

The examples have alpaca-1k's shape: its real lengths when the dataset can be loaded, otherwise
lengths drawn to a mean of about 90 tokens in our format, a third of that prompt. The bench prints
the machine first (bench/machine.py: CPU, memory bandwidth, fp32 matmul peak, date), then the
length statistics, seconds per 16 examples, the ratio, real tokens/s and achieved GFLOP/s
against the measured peak, and a profile of each variant's median round: the share of the step
in data (fetching and collating), forward, backward and optimizer, each with its GFLOP/s and
share of the peak, so the next optimisation starts from where the time goes.

The variants take turns, one optimizer step each on the same 16 examples, round after round, so a
neighbour's load falls on all of them alike. Each step is a fresh Trainer with the optimizer the
variant's last step left, as a run's steps share one: an untimed warm-up round first makes each
variant's AdamW state (1 GB to allocate and zero for GPT-2 124M, once a run, not once a step).

The headline, the last line ``train speedup: X.Yx (lora Z.Zx)``, is the wall-clock ratio (what
a user waits for), the median over rounds of each round's ratio, so one noisy round cannot
decide it. The two lines above it give two stricter figures: the CPU-time ratio (CPU-seconds of
all threads; the course's step leaves a core idle part of the time while ours keeps both busy),
and the total-time ratio (all rounds' seconds summed, so the rounds with long examples, where
ours gains least, weigh most).
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
from bench.machine import matmul_peak_gflops, measure  # noqa: E402

COURSE_MAX_LENGTH = 256  # the course pads every example to this
DATASET_ROWS = 1000  # alpaca-1k's size: the rows whose longest sets finetune's packed rows
BATCH, ACCUM = 4, 4  # the course's batch and accumulation: 16 examples a step
LORA_RANK = 16
VARIANTS = [  # ours: (name, remote.jobs.finetune flags beyond its defaults, bench flag adding it)
    ("ours", [], None),
    ("ours+lora", ["--lora-rank", str(LORA_RANK)], None),
    ("ours padded", ["--batching", "padded"], "padded"),
    ("ours bf16", ["--precision", "bf16"], "bf16"),
    ("ours unjoined", [], "unjoined"),  # one packed row per micro-batch, as before joining
    ("ours unshared", [], "unshared"),  # every example's prompt in full, as before sharing
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


def train_flops(
    cfg, spans: list[tuple[int, int]], logit_positions: int, lora: bool
) -> dict[str, float]:
    """FLOPs one pass costs, by phase, from its attention ``spans`` (queries, keys: the tokens
    computed, padding included, and each one's context): the blocks' matmuls (2 per weight per
    token forward, 4 backward, 2 with frozen weights, whose gradient is not computed), attention
    scores and values, lm_head at ``logit_positions``."""
    h, layers, v = cfg.n_embd, cfg.n_layer, cfg.vocab_size
    body = 12 * layers * h * h * sum(q for q, _ in spans)
    attention = sum(4 * layers * h * q * k for q, k in spans)
    head = logit_positions * 2 * h * v
    back = 1 if lora else 2  # frozen weights: only the gradient of the input
    return {
        "forward": 2 * body + attention + head,
        "backward": back * 2 * body + 2 * attention + back * head,
    }


PHASES = ("data", "forward", "backward", "optimizer", "other")
ADAMW_FLOPS = 15  # per trained parameter: clipping the gradient and the AdamW update


class StepTimer:
    """Wall and CPU time (all of this process's threads) of one optimizer step, and its wall
    time by phase, from hooks on the Trainer's own methods:

    - data: fetching and collating the step's micro-batches (``get_batch_samples``);
    - forward: ``compute_loss``; backward: the rest of ``training_step`` (autograd);
    - optimizer: from the step's last backward to its end: gradient clipping, the optimizer,
      the schedule, zero_grad; other: what is left (callbacks, bookkeeping).
    """

    def __init__(self, trainer):
        from transformers import TrainerCallback

        timer = self
        self.phases = dict.fromkeys(PHASES, 0.0)
        self.wall = self.cpu = 0.0
        self.t0, self.last_backward = (0.0, 0.0), 0.0

        class _CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                timer.t0 = (time.perf_counter(), time.process_time())

            def on_step_end(self, args, state, control, **kw):
                wall, cpu = time.perf_counter(), time.process_time()
                timer.wall += wall - timer.t0[0]
                timer.cpu += cpu - timer.t0[1]
                timer.phases["optimizer"] += wall - timer.last_backward

        def timed(fn, phase):
            def run(*a, **kw):
                t, c = time.perf_counter(), time.process_time()
                try:
                    return fn(*a, **kw)
                finally:
                    self.phases[phase] += time.perf_counter() - t
                    if phase == "data":  # before on_step_begin: counted in the step here
                        self.wall += time.perf_counter() - t
                        self.cpu += time.process_time() - c

            return run

        def training_step(*a, **kw):
            t, forward = time.perf_counter(), self.phases["forward"]
            try:
                return step(*a, **kw)
            finally:
                self.last_backward = time.perf_counter()
                self.phases["backward"] += self.last_backward - t
                self.phases["backward"] -= self.phases["forward"] - forward

        trainer.get_batch_samples = timed(trainer.get_batch_samples, "data")
        trainer.compute_loss = timed(trainer.compute_loss, "forward")
        step = trainer.training_step
        trainer.training_step = training_step
        trainer.add_callback(_CB())

    def result(self) -> dict:
        """The step's wall and CPU seconds and its phases; "other" is what they leave."""
        phases = dict(self.phases)
        phases["other"] = max(0.0, self.wall - sum(v for k, v in phases.items() if k != "other"))
        return {"wall": self.wall, "cpu": self.cpu, "phases": phases}


def train_keeping_optimizer(trainer, state: dict) -> None:
    """``trainer.train()`` with the optimizer the variant's last Trainer stepped, kept in
    ``state`` for the next.

    Each step gets a fresh Trainer (so every variant takes its turn on the same examples), but
    a real run keeps one optimizer for all its steps: without this, every timed step would also
    allocate and zero AdamW's two moments (1 GB for GPT-2 124M), which a run does once."""
    trainer.optimizer = state.get("optimizer")  # None: the Trainer makes one, as a run's first
    trainer.train()
    state["optimizer"] = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # unwrapped


def course_texts(rows) -> list[str]:
    return [
        f"Input: {r['instruction']} {r['input']}".rstrip() + f"\nOutput: {r['output']}"
        for r in rows
    ]


def course_step(model, tok, rows, out: Path, state: dict) -> tuple[dict, dict]:
    """One optimizer step of the course recipe on ``rows`` (16 examples), with the optimizer
    ``state`` holds from the variant's last step (see ``train_keeping_optimizer``)."""
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
    trainer = Trainer(
        model=model,
        args=targs,
        train_dataset=Dataset.from_dict(dict(enc)),
        data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
    )
    trainer.remove_callback(PrinterCallback)  # its end-of-train dict on every step
    timer = StepTimer(trainer)
    train_keeping_optimizer(trainer, state)
    spans = [(COURSE_MAX_LENGTH, COURSE_MAX_LENGTH)] * len(rows)
    real = sum(sum(m) for m in enc["attention_mask"])
    logits = len(rows) * COURSE_MAX_LENGTH
    return timer.result(), {"real_tokens": real, "spans": spans, "logits": logits}


def ours_args(flags: list[str]):
    """remote.jobs.finetune's own flags for a variant: its defaults plus ``flags``."""
    from remote.jobs import finetune

    return finetune.parse_args(["--max-steps", "1", "--device", "cpu", *flags])


def ours_step(
    model, tok, rows, out: Path, args, pack_tokens: int, state: dict, share: bool | None = None
) -> tuple[dict, dict]:
    """One optimizer step of remote.jobs.finetune's Trainer on the same 16 examples, the model
    prepared by finetune.prepare_model as a real run's is, packed rows joined up to
    ``pack_tokens`` as finetune joins them (--batch-size examples as long as the longest)."""
    from transformers.trainer_callback import PrinterCallback

    from remote.jobs import finetune

    feats = ours_features(tok, rows)
    targs = finetune.training_arguments(args, out / "ours", finetune.schedule(args, 16, 1), "cpu")
    targs = dataclasses.replace(
        targs,
        eval_strategy="no",
        save_strategy="no",
        disable_tqdm=True,
        logging_strategy="no",
        logging_first_step=False,
    )
    packing = args.batching == "packed"
    trainer = finetune.make_trainer(
        model, tok, feats, [], targs, packing=packing, pack_tokens=pack_tokens, share=share
    )
    trainer.remove_callback(PrinterCallback)
    timer = StepTimer(trainer)
    train_keeping_optimizer(trainer, state)
    info = {
        "real_tokens": sum(len(f["input_ids"]) for f in feats),
        "spans": trainer.spans,  # as computed: padded, packed, or with shared prefixes
        "logits": sum(sum(x != -100 for x in f["labels"][1:]) for f in feats),
    }
    return timer.result(), info


def make_rows(n: int, seed: int):
    words = word_source()
    tok, tok_name = load_tokenizer(words)
    tok.pad_token = tok.eos_token
    real = real_alpaca_lengths()
    if real and len(real) >= n:
        return tok, real[:n], "alpaca-1k (real)"
    return tok, synthetic_rows(n, tok, words, seed), f"synthetic, alpaca-1k-shaped ({tok_name})"


def ours_features(tok, rows) -> list[dict]:
    """Token ids and labels as finetune makes them: Alpaca format, EOS, --max-length 512."""
    from remote.jobs import finetune
    from remote.jobs.dataset import format_instruction
    from remote.jobs.sft_batches import tokenize_examples

    pairs = [format_instruction(r, tok.eos_token) for r in rows]
    return tokenize_examples(tok, pairs, finetune.MAX_LENGTH)[0]


def print_lengths(tok, rows) -> None:
    feats = ours_features(tok, rows)
    ours = [len(f["input_ids"]) for f in feats]
    prompt = sum(sum(x == -100 for x in f["labels"]) for f in feats)
    length_stats("ours (Alpaca format)", ours, f"prompt share {prompt / sum(ours):.0%}")
    course = [sum(m) for m in tok(course_texts(rows), truncation=True,
                                  max_length=COURSE_MAX_LENGTH)["attention_mask"]]  # fmt: skip
    pad = 1 - sum(course) / (COURSE_MAX_LENGTH * len(rows))
    length_stats("course (Input/Output)", course, f"padded to {COURSE_MAX_LENGTH}: {pad:.0%} pad")


def ratios(times: dict[str, list[dict]], name: str, which: str) -> list[float]:
    """Course / ``name`` per round, by ``which``: "wall" clock or "cpu" time."""
    return [c[which] / o[which] for c, o in zip(times["course"], times[name], strict=True)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (the median counts)")
    p.add_argument("--quick", action="store_true", help="a single round")
    p.add_argument("--padded", action="store_true", help="also time padded micro-batches")
    p.add_argument("--bf16", action="store_true", help="also time ours in mixed bf16")
    p.add_argument(
        "--unjoined", action="store_true", help="also time ours with one packed row a micro-batch"
    )
    p.add_argument(
        "--unshared", action="store_true", help="also time ours without shared prompt prefixes"
    )
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
    machine = measure()
    print(machine.line())
    per_step = BATCH * ACCUM
    tok, pool, source = make_rows(max(DATASET_ROWS, per_step * rounds), args.seed)
    rows = pool[: per_step * rounds]
    print(f"examples: {len(rows)} ({source})")
    print_lengths(tok, rows)
    # finetune joins packed micro-batches up to --batch-size examples as long as the dataset's
    # longest (its memory plan); the dataset here is the 1,000 rows these examples start.
    cap = BATCH * max(len(f["input_ids"]) for f in ours_features(tok, pool))
    cfg = GPT2Config()  # GPT-2 124M: 12 layers, 768 wide, 50,257 tokens, 1,024 positions
    torch.manual_seed(args.seed)
    init = GPT2LMHeadModel(cfg).state_dict()

    def fresh():
        model = GPT2LMHeadModel(cfg)
        model.load_state_dict(init)
        return model

    peaks = {n: machine.fp32_peak_gflops for n, _, _ in [("course", [], None), *VARIANTS]}
    if args.bf16:
        peaks["ours bf16"] = matmul_peak_gflops(dtype="bfloat16")
        print(f"bf16 matmul peak: {peaks['ours bf16']:.1f} GFLOP/s (for ours bf16)")
    flags = {n: ours_args(f) for n, f, opt in VARIANTS if opt is None or getattr(args, opt)}
    names = ["course", *flags]
    models = {"course": fresh(), **{n: prepare_model(fresh(), a) for n, a in flags.items()}}
    trained = {
        n: sum(p.numel() for p in m.parameters() if p.requires_grad) for n, m in models.items()
    }
    times: dict[str, list[dict]] = {n: [] for n in names}
    infos: dict[str, list[dict]] = {n: [] for n in names}
    # Interleaved: every variant takes one step on the same 16 examples, round after round,
    # so a neighbour's load on this shared machine falls on all of them alike. Round 0 is not
    # timed: it makes each variant's optimizer state, as a run's first step does, once.
    states: dict[str, dict] = {n: {} for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds + 1):
            first = (r - 1) * per_step if r else 0  # the warm-up steps on round 1's examples
            batch = rows[first : first + per_step]
            for name in names:
                if name == "course":
                    t, info = course_step(models[name], tok, batch, Path(tmp), states[name])
                else:
                    joined = 0 if name == "ours unjoined" else cap
                    share = False if name == "ours unshared" else None
                    t, info = ours_step(models[name], tok, batch, Path(tmp), flags[name], joined,
                                        states[name], share)  # fmt: skip
                if r:
                    times[name].append(t)
                    infos[name].append({**info, "trained": trained[name]})
            if not r:
                print("round 0 (warm-up, not timed): each variant's optimizer state made")
                continue
            walls = (f"{n} {times[n][-1]['wall']:.1f}/{times[n][-1]['cpu']:.1f}" for n in names)
            print(f"round {r} (wall/cpu s): " + ", ".join(walls))
    lora = {n for n, a in flags.items() if a.lora_rank}
    report(cfg, machine, peaks, names, times, infos, lora)
    return 0


def median_round(times: list[dict]) -> int:
    walls = [t["wall"] for t in times]
    return sorted(range(len(walls)), key=walls.__getitem__)[len(walls) // 2]


def report(cfg, machine, peaks: dict, names: list[str], times, infos, lora: set) -> None:
    """Per variant its median round, then where its time goes, then the CPU-time, total-time
    and (last) the wall-clock ratios."""
    print("median over rounds, seconds per 16 examples (wall; CPU-seconds of all threads):")
    for n in names:
        r = median_round(times[n])
        t, info = times[n][r], infos[n][r]
        wall, cpu = t["wall"], t["cpu"]
        flops = sum(train_flops(cfg, info["spans"], info["logits"], lora=n in lora).values())
        print(
            f"  {n:<13} wall {wall:6.2f} s  {statistics.median(ratios(times, n, 'wall')):4.1f}x  "
            f"{info['real_tokens'] / wall:6.0f} real tokens/s  {flops / wall / 1e9:6.1f} GFLOP/s "
            f"({flops / wall / 1e9 / peaks[n]:.0%} of peak)  cpu {cpu:6.1f} s "
            f"({cpu / machine.threads:.2f} s a thread)"
        )
    profile(cfg, peaks, names, times, infos, lora)
    full, lora_r = (statistics.median(ratios(times, n, "cpu")) for n in ("ours", "ours+lora"))
    print(
        f"cpu-time speedup: {full:.1f}x (lora {lora_r:.1f}x): the stricter figure; the course's "
        "step keeps only part of the cores busy (memory-bound logits over 4x256x50,257)"
    )
    full, lora_r = (total_ratio(times, n) for n in ("ours", "ours+lora"))
    print(
        f"total-time speedup: {full:.1f}x (lora {lora_r:.1f}x): all rounds' seconds summed, so the "
        "rounds of long examples weigh most"
    )
    full, lora_r = (statistics.median(ratios(times, n, "wall")) for n in ("ours", "ours+lora"))
    print(f"train speedup: {full:.1f}x (lora {lora_r:.1f}x)")


def profile(cfg, peaks: dict, names: list[str], times, infos, lora: set) -> None:
    """Where each variant's median round spends its time, and at what rate against the
    measured matmul peak."""
    print(
        "profile of the median round: share of the step's wall time, achieved GFLOP/s "
        "(share of the fp32 matmul peak)"
    )
    print(f"  {'phase':<10}" + "".join(f"{n:>27}" for n in names))
    rows = {n: times[n][median_round(times[n])] for n in names}
    info = {n: infos[n][median_round(times[n])] for n in names}
    for phase in PHASES:
        cells = []
        for n in names:
            seconds = rows[n]["phases"][phase]
            share = seconds / rows[n]["wall"]
            if phase in ("forward", "backward"):
                flops = train_flops(cfg, info[n]["spans"], info[n]["logits"], lora=n in lora)[phase]
            elif phase == "optimizer":
                flops = ADAMW_FLOPS * info[n]["trained"]
            else:
                flops = 0
            rate = flops / max(seconds, 1e-9) / 1e9
            cells.append(
                f"{seconds:5.2f} s {share:4.0%} {rate:6.1f} ({rate / peaks[n]:4.0%})"
                if flops
                else f"{seconds:5.2f} s {share:4.0%}{'-':>14}"
            )
        print(f"  {phase:<10}" + "".join(f"{c:>27}" for c in cells))
    print(
        "  (forward/backward: the matmul FLOPs of the blocks, attention and lm_head; optimizer: "
        f"~{ADAMW_FLOPS} FLOPs a trained parameter for clipping and AdamW, memory-bound, its state "
        "kept from the variant's last step as in a run)"
    )


def total_ratio(times: dict[str, list[dict]], name: str) -> float:
    """Course / ``name`` over all rounds' wall time: the mean seconds per 16 examples."""
    return sum(t["wall"] for t in times["course"]) / sum(t["wall"] for t in times[name])


if __name__ == "__main__":
    sys.exit(main())
