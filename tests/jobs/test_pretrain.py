"""remote/jobs/pretrain.py: tiny GPT-2s (2 layers, 64 wide) for a few steps, offline.

Most runs call ``main(argv)`` in this process (importing transformers costs seconds per
process); subprocesses only where they are the point: SIGKILL and torchrun.

    .venv/bin/python -m pytest tests/jobs/test_pretrain.py -q
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from facts import BEST_WEIGHTS, RunKey
from remote.jobs import rundir
from remote.jobs.pretrain import main

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    *("--n-layer", "2", "--n-head", "2", "--n-embd", "64", "--block-size", "32"),
    *("--batch-size", "8", "--eval-iters", "2", "--sample-tokens", "8", "--log-interval", "1"),
    *("--vocab-size", "512", "--warmup-steps", "2", "--lr", "3e-3", "--min-lr", "3e-4"),
]
STEPS = 20


def pretrain(runs: Path, name: str, *extra: str) -> int:
    return main([*TINY, "--runs-dir", str(runs), "--name", name, *extra])


def rows(run: Path, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in rundir.read_metrics(run / "metrics.jsonl") if key in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """One runs root for the module, so the token cache is built once."""
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def base_run(runs: Path) -> Path:
    """STEPS steps on the shipped corpus, evaluating and checkpointing every 5. Dropout is on
    so that a resume has to restore the RNG to match it."""
    args = ["--max-steps", str(STEPS), "--eval-interval", "5", "--dropout", "0.1"]
    assert pretrain(runs, "base", *args) == 0
    return runs / "base"


def test_loss_falls_on_the_shipped_corpus(base_run):
    val = rows(base_run, "val_loss")
    assert sorted(val) == [0, 5, 10, 15, 20]
    assert val[20] < val[0] - 0.5, val
    train = [v for _, v in sorted(rows(base_run, "loss").items())]
    assert len(train) == STEPS
    assert sum(train[-5:]) / 5 < sum(train[:5]) / 5 - 0.5, train
    meta = json.loads((base_run / "run.json").read_text())
    assert meta["status"] == "completed"
    assert meta["step"] == STEPS and meta["best_val_loss"] == pytest.approx(min(val.values()))
    assert meta["data"]["dtype"] == "uint16" and meta["data"]["documents"] == 8
    assert meta["data"]["val_tokens"] < meta["data"]["train_tokens"] / 5
    assert set(RunKey) <= set(meta)  # every key `fab runs --compare` reads
    assert meta[RunKey.TRAIN_TOKENS] == meta["data"]["train_tokens"]
    assert meta[RunKey.TRAIN_EXAMPLES] is None  # tokens are pretraining's data size
    assert meta[RunKey.KEPT_STEP] == meta[RunKey.MAX_STEPS] == STEPS  # --keep last
    assert meta[RunKey.FINAL_VAL_LOSS] == pytest.approx(val[STEPS])
    assert meta[RunKey.ELAPSED_S] > 0 and meta[RunKey.TOKENS_PER_S] > 0
    log = (base_run / "train.log").read_text()
    assert "tokenizer: a byte-level BPE trained on the corpus" in log  # offline: no gpt2
    assert "sample: A language model" in log


def test_run_directory_is_complete_and_verifiable(base_run):
    import torch

    for f in ("run.json", "train.log", "metrics.jsonl", "ckpt.pt", "loss.png", "manifest.sha256"):
        assert (base_run / f).stat().st_size > 0, f
    ckpt = torch.load(base_run / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == STEPS and ckpt["model_args"]["n_layer"] == 2
    assert ckpt["config"]["block_size"] == 32 and ckpt["best_val_loss"] < 10
    assert {"model", "optimizer", "rng", "sampler", "data"} <= set(ckpt)
    assert len(ckpt["rng"]) == 1 and {"torch", "numpy", "python"} <= set(ckpt["rng"][0])
    listed = {}
    for line in (base_run / "manifest.sha256").read_text().splitlines():
        digest, name = line.split("  ", 1)
        listed[name] = digest
    assert {"model/model.safetensors", "model/tokenizer.json", "loss.png"} <= set(listed)
    for name, digest in listed.items():
        assert rundir.sha256_file(base_run / name) == digest, name


def test_model_dir_loads_and_generates(base_run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = base_run / "model"
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.generation_config.eos_token_id == tok.eos_token_id == model.config.eos_token_id
    assert model.config.n_positions == 32 and tok.model_max_length == 32
    ids = tok("Attention is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=10, do_sample=False)
    assert out.shape[1] > ids.shape[1]
    assert tok.decode(out[0]).startswith("Attention is")
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_resume_reproduces_the_uninterrupted_loss_curve(runs, base_run):
    # The first half stops at step 10 but keeps the full run's schedule (--lr-decay-steps).
    half = ["--eval-interval", "5", "--dropout", "0.1", "--lr-decay-steps", str(STEPS)]
    assert pretrain(runs, "split", "--max-steps", str(STEPS // 2), *half) == 0
    assert pretrain(runs, "split", "--resume", "--max-steps", str(STEPS)) == 0
    straight, resumed = rows(base_run, "loss"), rows(runs / "split", "loss")
    assert sorted(resumed) == list(range(1, STEPS + 1))  # nothing logged twice
    assert resumed == straight  # bit for bit: same batches, same dropout masks, same steps
    assert rows(runs / "split", "val_loss") == rows(base_run, "val_loss")
    assert "resumed split at step 10" in (runs / "split" / "train.log").read_text()
    assert "split" not in (base_run / "train.log").read_text()  # each run logs to its own


def test_sigterm_checkpoints_and_resume_continues(runs):
    run = runs / "sigterm"

    def kill_at_step_3():
        deadline = time.time() + 120
        while time.time() < deadline and max(rows(run, "loss"), default=0) < 3:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    threading.Thread(target=kill_at_step_3, daemon=True).start()
    code = pretrain(runs, "sigterm", "--max-steps", "1000", "--eval-interval", "500")
    assert code == 128 + signal.SIGTERM
    meta = json.loads((run / "run.json").read_text())
    assert meta["status"] == "interrupted"
    import torch

    stopped = torch.load(run / "ckpt.pt", weights_only=True)["step"]
    assert stopped >= 3 and stopped == meta["step"]
    assert signal.getsignal(signal.SIGTERM) is before  # the job put the handler back
    assert pretrain(runs, "sigterm", "--resume", "--max-steps", str(stopped + 2)) == 0
    assert sorted(rows(run, "loss")) == list(range(1, stopped + 3))
    resumed = json.loads((run / "run.json").read_text())
    assert resumed["status"] == "completed"
    assert resumed[RunKey.ELAPSED_S] > meta[RunKey.ELAPSED_S] > 0  # both sessions counted


def test_keep_best_keeps_the_best_evaluations_weights(runs):
    """A learning rate that wrecks the model makes step 0 the best evaluation: --keep best puts
    those weights in model/ and says which step they are from."""
    import torch
    from safetensors.torch import load_file

    args = ["--max-steps", "4", "--eval-interval", "2", "--lr", "5", "--min-lr", "5"]
    assert pretrain(runs, "best", *args, "--warmup-steps", "0", "--keep", "best") == 0
    run = runs / "best"
    val = rows(run, "val_loss")
    meta = json.loads((run / "run.json").read_text())
    assert min(val, key=val.get) == 0 < 4 and val[4] > val[0]
    assert meta[RunKey.KEPT_STEP] == 0 and meta[RunKey.STEP] == 4
    assert meta[RunKey.BEST_VAL_LOSS] == pytest.approx(val[0])
    assert meta[RunKey.FINAL_VAL_LOSS] == pytest.approx(val[4])
    best = torch.load(run / BEST_WEIGHTS, weights_only=True)
    served = load_file(run / "model" / "model.safetensors")
    last = torch.load(run / "ckpt.pt", weights_only=True)["model"]
    name = "transformer.h.0.mlp.c_fc.weight"
    assert torch.equal(served[name], best[name]) and not torch.equal(served[name], last[name])
    assert BEST_WEIGHTS not in (run / "manifest.sha256").read_text()  # stays on the VM


def test_course_recipe_sets_part_1_and_typed_flags_win(runs):
    from remote.jobs import flags
    from remote.jobs.pretrain import RECIPES, Config, check_config

    c, _ = flags.parse(Config, ["--recipe", "course"], prog="p", description="",
                       check=check_config, recipes=RECIPES)  # fmt: skip
    assert (c.batch_size, c.lr, c.min_lr, c.lr_decay_steps) == (12, 6e-5, 6e-6, 1500)
    assert (c.max_steps, c.eval_interval, c.eval_iters) == (2000, 1000, 100)
    assert (c.sample_temperature, c.sample_top_k, c.block_size, c.init) == (0.1, 10, 64, "scratch")
    # A short run under the recipe, the tiny shape typed over it.
    assert pretrain(runs, "course", "--recipe", "course", "--max-steps", "2") == 0
    saved = json.loads((runs / "course" / "run.json").read_text())["args"]
    assert saved["recipe"] == "course" and saved["lr_decay_steps"] == 1500
    assert saved["sample_top_k"] == 10 and saved["sample_temperature"] == 0.1
    assert saved["batch_size"] == 8 and saved["n_layer"] == 2 and saved["max_steps"] == 2


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_write_keeps_the_last_good_one(runs, tmp_path):
    """A real SIGKILL while the second checkpoint is half written; the first must survive."""
    marker = tmp_path / "writing"
    child = textwrap.dedent(
        """
        import io, sys, time, pathlib, torch
        real, calls = torch.save, []
        def half_then_hang(obj, f, *args, **kwargs):
            calls.append(1)
            if len(calls) < 2:
                return real(obj, f, *args, **kwargs)
            buf = io.BytesIO()
            real(obj, buf, *args, **kwargs)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            f.flush()
            pathlib.Path(sys.argv[1]).write_text("half written")
            time.sleep(600)
        torch.save = half_then_hang
        from remote.jobs.pretrain import main
        sys.exit(main(sys.argv[2:]))
        """
    )
    args = [*TINY, "--runs-dir", str(runs), "--name", "killed", "--max-steps", "6"]
    args += ["--eval-interval", "2"]
    proc = subprocess.Popen([sys.executable, "-c", child, str(marker), *args], cwd=ROOT)
    try:
        deadline = time.time() + 240
        while not marker.exists():
            assert proc.poll() is None, "the child exited before its second checkpoint"
            assert time.time() < deadline, "the child never reached its second checkpoint"
            time.sleep(0.1)
        run = runs / "killed"
        assert list(run.glob(".ckpt.pt.*.tmp")), "the kill must land mid-write"
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    import torch

    ckpt = torch.load(run / "ckpt.pt", weights_only=True)  # whole and loadable
    assert ckpt["step"] == 2
    meta = json.loads((run / "run.json").read_text())
    assert meta["status"] == "running" and meta["pid"] == proc.pid  # killed: the pid is gone
    assert pretrain(runs, "killed", "--resume") == 0
    assert not list(run.glob(".ckpt.pt.*.tmp"))
    assert torch.load(run / "ckpt.pt", weights_only=True)["step"] == 6


@pytest.mark.slow
def test_torchrun_two_cpu_processes_only_rank_0_writes(runs):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "remote.jobs.pretrain", *TINY, "--runs-dir", str(runs), "--name", "ddp"]
    cmd += ["--max-steps", "4", "--eval-interval", "2", "--grad-accum", "2", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-3000:]
    run = runs / "ddp"
    meta = json.loads((run / "run.json").read_text())
    assert meta["status"] == "completed" and meta["world_size"] == 2
    assert sorted(rows(run, "loss")) == list(range(1, 5))  # one writer: no step twice
    assert (run / "train.log").read_text().count("done: best val loss") == 1
    log = (run / "train.log").read_text()
    assert "(8 x 32 x 2 accum x 2 processes)" in log
    assert "step 4: 2 replicas in sync" in log  # DDP kept the weights identical
    import torch

    rngs = torch.load(run / "ckpt.pt", weights_only=True)["rng"]
    assert len(rngs) == 2  # both ranks took part in the checkpoint
    assert not torch.equal(rngs[0]["torch"], rngs[1]["torch"])  # seeded per rank
    assert sorted(p.name for p in runs.iterdir() if p.name.startswith("ddp")) == ["ddp"]


def test_init_from_a_pretrained_model_dir(runs, tiny_model_dir):
    assert pretrain(runs, "init", "--init", str(tiny_model_dir), "--max-steps", "2") == 0
    config = json.loads((runs / "init" / "model" / "config.json").read_text())
    assert config["n_embd"] == 64 and config["n_layer"] == 2 and config["n_positions"] == 256
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(tiny_model_dir)
    ours = AutoTokenizer.from_pretrained(runs / "init" / "model")
    assert ours.get_vocab() == theirs.get_vocab()


def test_block_size_past_the_pretrained_positions_is_refused(runs, tiny_model_dir, capsys):
    msg = _error(capsys, pretrain(runs, "e5", "--init", str(tiny_model_dir), "--block-size", "300"))
    assert "longer than the 256 positions" in msg and "Use --block-size 256 or less" in msg
    assert not (runs / "e5").exists()


def test_hf_dataset_text_column(runs, tmp_path):
    data = tmp_path / "rows.jsonl"
    corpus = ROOT / "remote" / "jobs" / "data" / "corpus"
    paragraphs = [p for f in sorted(corpus.glob("*.txt")) for p in f.read_text().split("\n\n")]
    data.write_text(
        "".join(json.dumps({"id": i, "body": p}) + "\n" for i, p in enumerate(paragraphs))
    )
    hf = ["--hf-dataset", str(data), "--max-steps", "2", "--tokenizer", "bpe"]
    assert pretrain(runs, "hf", *hf, "--text-column", "body") == 0
    meta = json.loads((runs / "hf" / "run.json").read_text())
    assert meta["data"]["documents"] == len([p for p in paragraphs if p.strip()])


def _error(capsys, code: int) -> str:
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "Traceback" not in "\n".join(err)
    return err[-1]


def test_missing_corpus_path_is_a_clear_error(runs, capsys):
    msg = _error(capsys, pretrain(runs, "e1", "--corpus", str(runs / "nope.txt")))
    assert "does not exist" in msg and "nope.txt" in msg and "--corpus" in msg
    assert not (runs / "e1").exists()  # nothing was started


def test_empty_corpus_is_a_clear_error(runs, tmp_path, capsys):
    (tmp_path / "blank.txt").write_text("  \n\n ")
    msg = _error(capsys, pretrain(runs, "e2", "--corpus", str(tmp_path)))
    assert "the corpus is empty" in msg
    (tmp_path / "empty").mkdir()
    msg = _error(capsys, pretrain(runs, "e2", "--corpus", str(tmp_path / "empty")))
    assert "no .txt files" in msg
    assert not (runs / "e2").exists()


def test_block_size_longer_than_the_corpus_is_a_clear_error(runs, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("A tiny corpus about attention and tokens. " * 30)
    msg = _error(capsys, pretrain(runs, "e3", "--corpus", str(short), "--block-size", "512"))
    assert "--block-size 512 is longer than the corpus allows" in msg
    assert "513 tokens" in msg and "validation split" in msg
    assert "Use --block-size" in msg and "or less" in msg
    assert not (runs / "e3").exists()


def test_wrong_text_column_names_the_columns(runs, tmp_path, capsys):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"body": "some text"}\n')
    msg = _error(capsys, pretrain(runs, "e4", "--hf-dataset", str(data)))
    assert "no column 'text'" in msg and "body" in msg and "--text-column" in msg


def test_existing_run_and_changed_shape_on_resume_are_refused(runs, base_run, capsys):
    msg = _error(capsys, pretrain(runs, "base", "--max-steps", "2"))
    assert "already exists" in msg and "--resume" in msg
    msg = _error(capsys, pretrain(runs, "base", "--resume", "--n-layer", "3"))
    assert "--n-layer cannot change on --resume" in msg
    msg = _error(capsys, pretrain(runs, "never-ran", "--resume"))
    assert "no run 'never-ran'" in msg and "Drop --resume" in msg
    (runs / "no-ckpt").mkdir()
    (runs / "no-ckpt" / "run.json").write_text("{}")  # killed before its first evaluation
    msg = _error(capsys, pretrain(runs, "no-ckpt", "--resume"))
    assert "no checkpoint" in msg and "--overwrite" in msg


BAD_FLAGS = [
    ["--bogus", "1"],
    ["--n-layer", "two"],
    ["--lr", "fast"],
    ["--n-embd", "65"],
    ["--init"],
    ["--device", "tpu"],
    ["--resume"],
    ["--corpus", "a", "--hf-dataset", "b"],
    ["--keep", "worst"],
    ["--sample-temperature", "0"],
]


@pytest.mark.parametrize("argv", BAD_FLAGS)
def test_bad_flags_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_help_lists_every_default(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--corpus", "--hf-dataset", "--n-layer", "--grad-accum", "--eval-interval"):
        assert flag in out
    assert "(default: 128)" in out and "torchrun" in out
