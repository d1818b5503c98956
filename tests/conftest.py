"""Suite-wide rules and shared fixtures.

- Offline: the Hugging Face libraries are told so, their cache points at an empty temp dir, and
  any socket connect to a non-loopback address fails the test that tried it.
- In CI (``CI`` set), a skipped test is a failed test: `.ci/run` installs every system part
  (sshd, Chromium, cloud-init, shellcheck), so a skip there means something is broken.
- ``tiny_model_dir``: a 2-layer GPT-2 with a BPE tokenizer trained on the fly, saved as a
  complete Hugging Face directory with the chat template; built once per session.
- ``tiny_lora_dir``: a LoRA "run" over it, saved by finetune's own ``save_model`` (the merged
  model, and its adapter in ``model/adapter/``); built once per session.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from facts import FinishReason

_HF_HOME = tempfile.mkdtemp(prefix="tinycloud-hf-")
os.environ.update(
    HF_HOME=_HF_HOME,
    HF_HUB_OFFLINE="1",
    HF_DATASETS_OFFLINE="1",
    TRANSFORMERS_OFFLINE="1",
    HF_HUB_DISABLE_TELEMETRY="1",
    DO_NOT_TRACK="1",
    TOKENIZERS_PARALLELISM="false",
    MPLBACKEND="Agg",
)

ROOT = Path(__file__).resolve().parent.parent
IN_CI = bool(os.environ.get("CI"))


# --- no network ------------------------------------------------------------------------------

# Networks a test made on this machine itself (tests/vm's veth pair to the booted stand-in VM):
# reached like loopback, since nothing on them is outside this machine.
LOCAL_TEST_NETWORKS: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []

_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex


def _check_address(sock: socket.socket, address) -> None:
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    host = address[0]
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        if host == "localhost":
            return
        raise OSError(f"tests are offline: refusing to connect to {host!r}") from None
    local = ip.is_loopback or ip.is_unspecified or any(ip in n for n in LOCAL_TEST_NETWORKS)
    if not local:
        raise OSError(f"tests are offline: refusing to connect to {host}")


def _guarded_connect(self, address):
    _check_address(self, address)
    return _real_connect(self, address)


def _guarded_connect_ex(self, address):
    _check_address(self, address)
    return _real_connect_ex(self, address)


socket.socket.connect = _guarded_connect  # type: ignore[method-assign]
socket.socket.connect_ex = _guarded_connect_ex  # type: ignore[method-assign]


# --- CI: a skip is a failure -----------------------------------------------------------------


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, where every system part is installed: {reason}"


# --- the order files start in under xdist -----------------------------------------------------

# The longest files (seconds summed by file from `pytest --durations=0`, 2026-11-30: 264, 144,
# 140, 138, 110, 99, 83, 82 of the suite's 1,465), so each starts when a worker is first free.
# Left to itself, `--dist loadfile` starts the files with the most tests first, and these few-test
# files came last and ended the run. A worker holds two files, the one running and the next, so
# the longest is followed by a short one (test_js). Only the order changes: every file's tests
# still run in their own order, on one worker (pyproject.toml: --no-loadscope-reorder).
LONGEST_FIRST = (
    "tests/vm/test_booted_vm.py",
    "tests/remote/test_tasks_over_ssh.py",
    "tests/jobs/test_finetune.py",
    "tests/web/test_js.py",
    "tests/remote/test_demo.py",
    "tests/web/test_chat_page.py",
    "tests/serving/test_serving_fuzz.py",
    "tests/remote/test_notebook.py",
    "tests/remote/test_serve_runs.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable


# --- shared fixtures ---------------------------------------------------------------------------


# Debian's Chromium, driven by playwright (never a downloaded browser). Without the networking
# flags Chromium keeps trying to reach Google's services, which this offline machine refuses.
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless=new",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def free_port() -> int:
    """A TCP port free on loopback right now (for real servers the tests start)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def port() -> int:
    return free_port()


TINY_TEXT = (
    "A language model reads text one token at a time and learns to predict the next one. "
    "GPT-2 is a decoder-only transformer: attention looks back, never forward. "
    "Fine-tuning teaches it a format, and the end-of-text token teaches it to stop. "
    "The quick brown fox jumps over the lazy dog; 0123456789 and punctuation, too! "
)


def wait_for_health(url: str, proc: subprocess.Popen | None = None, timeout: float = 90) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {proc.stdout.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not become healthy in {timeout}s")


def start_subprocess_server(
    args: list[str], port: int, env: dict[str, str] | None = None
) -> subprocess.Popen:
    """``python -m serving.server`` exactly as a user runs it (the serving and web tests)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.Popen(
        [sys.executable, "-m", "serving.server", "--port", str(port), "--threads", "1", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_for_health(f"http://127.0.0.1:{port}", proc)
    return proc


def stop_subprocess_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def tiny_texts() -> list[str]:
    """Text to train the tiny tokenizer on: the shipped corpus when present, else a paragraph."""
    corpus = ROOT / "remote" / "jobs" / "data" / "corpus"
    files = sorted(corpus.glob("*.txt")) if corpus.is_dir() else []
    texts = [f.read_text(encoding="utf-8") for f in files]
    return texts or [TINY_TEXT] * 20


def build_tiny_model(out: Path, *, n_positions: int = 256, seed: int = 0) -> Path:
    """Save a random 2-layer, 64-wide GPT-2 with a freshly trained byte-level BPE."""
    import torch
    from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel

    from remote.jobs.prompts import save_tokenizer_with_chat_format
    from remote.jobs.tokenizer import train_bpe

    tok = train_bpe(tiny_texts(), vocab_size=512, min_frequency=1)
    tok.model_max_length = n_positions
    torch.manual_seed(seed)
    eos = tok.eos_token_id
    config = GPT2Config(
        vocab_size=len(tok),
        n_positions=n_positions,
        n_embd=64,
        n_layer=2,
        n_head=2,
        bos_token_id=eos,
        eos_token_id=eos,
    )
    model = GPT2LMHeadModel(config)
    model.generation_config = GenerationConfig(bos_token_id=eos, eos_token_id=eos)
    out.mkdir(parents=True, exist_ok=True)
    save_tokenizer_with_chat_format(tok, out)
    model.save_pretrained(out)
    return out


def build_lora_run(base: Path, out: Path, *, targets: str | None = None, seed: int = 0) -> Path:
    """A LoRA fine-tune of ``base`` as finetune saves it (``save_model``: merged weights in
    ``out``, the adapter in ``out/adapter``), with random B matrices so the adapter changes the
    model (peft starts B at zero). ``targets``: None for peft's default (c_attn), or
    "all-linear"."""
    import torch
    from peft import get_peft_model
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from remote.jobs.models import lora_config, save_model

    model = get_peft_model(GPT2LMHeadModel.from_pretrained(base), lora_config(4, 8, targets))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    save_model(model, AutoTokenizer.from_pretrained(base), out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model") / "model")


def chat_in_chromium(page: Path, url: str, screenshot: Path) -> None:
    """Open the page from disk as a user would, send one message, see an answer stream in."""
    if not CHROMIUM.exists():
        pytest.skip("Chromium is not installed: apt-get install chromium (CI installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            tab = browser.new_page()
            dialogs: list[str] = []
            tab.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            tab.goto(page.resolve().as_uri())
            assert url in tab.content()
            tab.get_by_label("Message").fill("Name a primary colour.")
            tab.keyboard.press("Enter")
            tab.wait_for_function(
                "() => document.querySelector('#log .assistant .finish')"
                " && !document.querySelector('#log .streaming')",
                timeout=60_000,
            )
            finish = tab.locator("#log .assistant .finish").last.text_content()
            assert finish in set(FinishReason), finish
            tab.screenshot(path=str(screenshot))
            assert not dialogs
        finally:
            browser.close()


@pytest.fixture(scope="session")
def tiny_lora_dir(tiny_model_dir, tmp_path_factory) -> Path:
    return build_lora_run(tiny_model_dir, tmp_path_factory.mktemp("tiny-lora") / "model")


def wait_until(predicate, timeout: float = 10.0) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` passes; its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def wait_for(what: str, check, timeout: float = 240.0, every: float = 0.5):
    """Poll ``check`` until it returns something truthy (returned); else fail, naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
