"""Loading and saving the models every job works on, with the errors a user can act on.

tok = load_tokenizer("runs/sft-1/model")          # EOS required; pad = EOS when missing
model = load_model("gpt2")                         # JobError with a hint when it cannot
model = add_lora(model, rank=16, alpha=32)         # peft adapters, merged again by save_model
save_model(model, tok, run.model_dir)              # a plain dir TGI and the native server load
                                                   # (+ model/adapter/ for a LoRA model)
device = pick_device("auto", local_rank)           # "cpu" or "cuda:N"
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from facts import ADAPTER_DIR
from remote.jobs.errors import JobError
from remote.jobs.prompts import save_tokenizer_with_chat_format
from remote.jobs.rundir import atomic_dir


def pick_device(flag: str, local_rank: int = 0) -> str:
    """``--device auto|cpu|cuda`` as a torch device string; each torchrun rank its own GPU."""
    import torch

    if flag == "cuda" and not torch.cuda.is_available():
        raise JobError("--device cuda: no CUDA GPU is visible. Use --device cpu or auto")
    if flag == "cpu" or not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{local_rank}"


def load_hint(source: str, exc: BaseException, what: str = "model") -> str:
    """Why ``source`` did not load (the library's first line) and what to pass instead."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")
    if Path(source).exists():
        return f"could not load {what} {source!r}: {first}. It must be a save_pretrained directory"
    return (
        f"could not load {what} {source!r}: {first}. Give a save_pretrained directory "
        "(e.g. runs/<run>/model) or a hub id this machine can download"
    )


def check_source(source: str, what: str = "model") -> None:
    """Fail at once on a local path that is not there, instead of asking the Hub for it.

    A hub id is ``name`` or ``owner/name``; anything that starts like a path (``.``, ``/``,
    ``~``) or has more than one ``/`` (``runs/<run>/model``) can only be a directory here.
    """
    path = Path(source).expanduser()
    looks_local = source.startswith((".", "/", "~")) or source.count("/") > 1
    if looks_local and not path.exists():
        raise JobError(
            f"could not load {what} {source!r}: there is no such directory. Give a "
            "save_pretrained directory (e.g. runs/<run>/model) or a hub id such as gpt2"
        )


def load_tokenizer(source: str) -> Any:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise JobError(load_hint(source, exc)) from exc
    if tok.eos_token is None:
        raise JobError(
            f"the tokenizer of {source!r} has no EOS token, so no text could end. "
            "Use a model whose tokenizer has one (GPT-2's <|endoftext|>)"
        )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # GPT-2 has none; padding is masked out anyway
    return tok


def load_model(source: str, kind: str = "AutoModelForCausalLM") -> Any:
    import transformers

    try:
        model = getattr(transformers, kind).from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise JobError(load_hint(source, exc)) from exc
    fuse_gelu(model)
    return model


def fuse_gelu(model: Any) -> int:
    """Swap GPT-2's ``gelu_new`` modules for torch's one-kernel tanh GELU; returns how many.

    transformers writes ``gelu_new`` as eight elementwise operations, each a pass over the
    4 x n_embd-wide MLP activations, forward and again backward: about a sixth of a CPU
    fine-tuning step for GPT-2 124M. ``F.gelu(approximate="tanh")`` is the same formula in one
    kernel. Only the modules change; the saved config still says ``gelu_new``, so every
    loader, TGI's included, builds the model it always did.
    """
    from transformers.activations import GELUTanh, NewGELUActivation

    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is NewGELUActivation:
                setattr(parent, name, GELUTanh())
                swapped += 1
    return swapped


def sparse_tied_embedding(model: Any) -> bool:
    """Give the input embedding a sparse gradient when it is tied to the output layer.

    Dense, the embedding's backward writes a zeroed vocabulary x n_embd matrix (154 MB for
    GPT-2) for the few hundred rows a micro-batch touches, and autograd then adds it to the
    output layer's gradient of the same shape; sparse, it adds just those rows into that dense
    gradient. The parameter's gradient stays dense (the output layer's part is), so optimizers,
    clipping and checkpoints see nothing different. Not for an untied embedding (its gradient
    would be sparse, which AdamW refuses) nor under DDP (which would all-reduce it as sparse).
    """
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    tied = outputs is not None and inputs.weight is outputs.weight
    if not tied or not inputs.weight.requires_grad or not hasattr(inputs, "sparse"):
        return False
    inputs.sparse = True
    return True


def without_lora(model: Any) -> Any:
    """The transformers model inside a peft wrapper (``model`` itself when there is none)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextmanager
def probing(model: Any) -> Iterator[None]:
    """Eval mode and no gradients for a probe forward; the mode is restored afterwards, so a
    probe never leaves dropout off (or on) behind the caller's back."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def set_dropout(model: Any, p: float) -> None:
    """Set every dropout in ``model`` to ``p``, whatever the architecture names them.

    Setting the modules (not the config) is what counts once the model is built; attention
    dropout reads its module's ``p`` too. The saved config is left as it was, so a later run
    on this model starts from the architecture's own value.
    """
    from torch import nn

    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout must be in [0, 1), not {p}")
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p


def lora_config(rank: int, alpha: int, targets: Any = None) -> Any:
    """LoRA on ``targets`` (None: peft's default modules for the architecture; GPT-2: the fused
    q/k/v), no dropout, for a causal LM."""
    from peft import LoraConfig

    return LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM"
    )


def add_lora(model: Any, rank: int, alpha: int) -> Any:
    """LoRA adapters on peft's default modules, or on every linear layer for architectures
    peft has no default for."""
    from peft import get_peft_model

    try:
        return get_peft_model(model, lora_config(rank, alpha))
    except ValueError:
        return get_peft_model(model, lora_config(rank, alpha, "all-linear"))


def save_model(model: Any, tok: Any, model_dir: Path) -> None:
    """A plain save_pretrained directory any server loads: LoRA merged in, the KV cache on,
    generation stopping at EOS, and the chat template of prompts.py in the tokenizer.

    A LoRA model also keeps its adapter, unmerged, in ``model/adapter/`` (peft's
    ``adapter_config.json``, naming the base it was trained on, and ``adapter_model.safetensors``:
    a few MB), so one server can serve several LoRA runs over a single copy of their base
    (``fab serve --run A --run B``), as TGI's multi-LoRA does."""
    with atomic_dir(model_dir) as tmp:  # a server never finds half a model
        if hasattr(model, "merge_and_unload"):
            model.save_pretrained(tmp / ADAPTER_DIR)  # before the merge changes the weights
            model = model.merge_and_unload()
        model.config.use_cache = True
        if model.generation_config is not None:
            model.generation_config.eos_token_id = tok.eos_token_id
            model.generation_config.pad_token_id = tok.pad_token_id
        model.save_pretrained(tmp)
        save_tokenizer_with_chat_format(tok, tmp)
