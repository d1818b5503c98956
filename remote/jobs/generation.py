"""Model-side pieces of ``evaluate``: load a model, answer a prompt, score text.

    from remote.jobs.generation import Settings, load_lm, answer, token_loss, RewardModel
    model, tok = load_lm("runs/sft-1/model", device="cpu")
    a = answer(model, tok, prompt_text, Settings(max_new_tokens=64), seed=0)
    a.text, a.finish_reason, a.new_tokens          # finish_reason as TGI says it

Finish reasons use TGI's words, so the evaluation speaks the same language as the server:
``eos_token`` (the model stopped on its own), ``stop_sequence`` (a ``--stop`` string ended it)
and ``length`` (it was cut off: the "never stops talking" symptom).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from facts import FinishReason
from remote.jobs.errors import JobError
from remote.jobs.models import load_hint, load_model, load_tokenizer
from remote.jobs.sft_batches import PadToLongest, response_loss, tokenize_examples


@dataclass(frozen=True)
class Settings:
    """Generation settings; greedy unless ``do_sample``."""

    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()

    def describe(self) -> str:
        how = (
            f"sampling (temperature {self.temperature}, top-p {self.top_p}, top-k {self.top_k})"
            if self.do_sample
            else "greedy"
        )
        stops = f", stop {list(self.stop)}" if self.stop else ""
        return (
            f"{how}, max {self.max_new_tokens} new tokens, repetition penalty "
            f"{self.repetition_penalty}{stops}"
        )


@dataclass
class Answer:
    text: str
    finish_reason: str
    new_tokens: int
    seconds: float
    reward: float | None = None

    def to_json(self) -> dict[str, Any]:
        """A report.jsonl row's answer fields (``answer`` is the text)."""
        row = {k: v for k, v in asdict(self).items() if k != "text"}
        return {"answer": self.text, **row}


def load_lm(source: str, device: str = "cpu"):
    """(model in eval mode on ``device``, tokenizer with a pad token) from a dir or hub id."""
    tok, model = load_tokenizer(source), load_model(source)
    return model.to(device).eval(), tok


def context_size(model: Any) -> int:
    cfg = model.config
    return int(getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", 1024))


def _generate_kwargs(tok: Any, s: Settings, room: int) -> dict[str, Any]:
    kw: dict[str, Any] = {
        "max_new_tokens": min(s.max_new_tokens, room),
        "do_sample": s.do_sample,
        "repetition_penalty": s.repetition_penalty,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    if s.do_sample:
        kw.update(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k)
    else:  # the model's generation_config may carry sampling values; greedy ignores them
        kw.update(temperature=None, top_p=None, top_k=None)
    if s.stop:
        kw.update(stop_strings=list(s.stop), tokenizer=tok)
    return kw


def answer(model: Any, tok: Any, prompt: str, s: Settings, seed: int) -> Answer:
    """One completion of ``prompt``, seeded per prompt so it does not depend on which other
    prompts ran before it (on this rank or another, in this run or a resumed one)."""
    import torch

    ids = tok(prompt, return_tensors="pt")["input_ids"]
    window = context_size(model)
    keep = max(window - min(s.max_new_tokens, window // 2), 1)
    ids = ids[:, -keep:]  # an over-long prompt loses its start, not the question at its end
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            input_ids=ids.to(model.device),
            attention_mask=torch.ones_like(ids).to(model.device),
            **_generate_kwargs(tok, s, window - ids.shape[1]),
        )
    seconds = time.perf_counter() - t0
    new = out[0, ids.shape[1] :].tolist()
    reason = FinishReason.LENGTH
    if tok.eos_token_id in new:
        new, reason = new[: new.index(tok.eos_token_id)], FinishReason.EOS
    text = tok.decode(new, skip_special_tokens=True)
    cut = [i for i in (text.find(x) for x in s.stop) if i >= 0]
    if cut:  # generation halts on a stop string; it is not part of the answer
        text, reason = text[: min(cut)], FinishReason.STOP
    return Answer(text.strip(), reason, len(new), round(seconds, 3))


# --- eval loss / perplexity ---------------------------------------------------------------------


def token_loss(
    model: Any, tok: Any, examples: Iterable[tuple[str, str]], batch_size: int = 8
) -> tuple[float, int]:
    """(summed negative log-likelihood, number of scored tokens) over ``examples``.

    The (prompt, completion) pairs are tokenized and batched as fine-tuning does (sft_batches.py),
    so the loss is on the completion and its EOS only, and padding changes nothing. Sums, not
    means, so ranks and batches combine exactly: perplexity is ``exp(total nll / total
    tokens)``, every scored token weighing the same.
    """
    import torch

    feats, _ = tokenize_examples(tok, list(examples), context_size(model))
    feats.sort(key=lambda f: len(f["input_ids"]))  # similar lengths together: little padding
    pad = PadToLongest(tok.pad_token_id)
    nll, count = 0.0, 0
    for i in range(0, len(feats), batch_size):
        batch = {k: v.to(model.device) for k, v in pad(feats[i : i + batch_size]).items()}
        with torch.no_grad():
            losses = response_loss(model, batch, reduction="none")
        nll += float(losses.sum())
        count += losses.numel()
    return nll, count


# --- reward model ---------------------------------------------------------------------------------


class RewardModel:
    """A sequence-classification reward model (e.g. OpenAssistant/reward-model-deberta-v3-large-v2)
    reading (question, answer) as a text pair; higher is better."""

    def __init__(self, source: str, device: str = "cpu", max_length: int = 512):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            self.tok = AutoTokenizer.from_pretrained(source)
            self.model = AutoModelForSequenceClassification.from_pretrained(source)
        except OSError as exc:
            raise JobError(load_hint(source, exc, what="reward model")) from exc
        self.model.to(device).eval()
        if self.tok.pad_token is None and self.tok.eos_token is not None:
            self.tok.pad_token = self.tok.eos_token
        if getattr(self.model.config, "pad_token_id", None) is None:
            self.model.config.pad_token_id = self.tok.pad_token_id
        self.source, self.max_length = source, max_length

    def score(self, question: str, answer: str) -> float:
        """The last logit: the reward itself for single-output models (num_labels == 1), the
        "good" class for two-class ones."""
        import torch

        enc = self.tok(
            question, answer, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        with torch.no_grad():
            logits = self.model(**enc.to(self.model.device)).logits
        return round(float(logits[0, -1]), 4)
