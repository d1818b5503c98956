"""The facts every layer of tinycloud agrees on, written down once.

    python -c "import facts; print(facts.API_PORT, facts.RUNS_DIR_NAME, facts.Output.PUBLIC_DNS)"

Standard library only, and nothing from this repository: the Pulumi program (``infra/``), the
control side (``remote/``), the jobs and the server on the VM (``remote/jobs/``, ``serving/``)
and the chat page renderer (``web/``) all import it, and `fab setup` ships it to the VM beside
the jobs. A fact that two layers need lives here and nowhere else — no second copy, and no test
that two copies still match.
"""

from __future__ import annotations

import hashlib
import re
from enum import StrEnum
from pathlib import Path

# --- the machine ---------------------------------------------------------------------------------
SSH_USER = "ubuntu"  # Ubuntu 24.04 and the Deep Learning AMI both log in as ubuntu
SSH_PORT = 22
API_PORT = 8080  # the inference API, native server and TGI alike; the security group opens it
REMOTE_DIR_NAME = "tinycloud"  # the work directory on the VM, under the user's home
RUNS_DIR_NAME = "runs"  # the runs root, inside the work directory (and ./runs locally)
VM_HOME = f"/home/{SSH_USER}"
VM_WORK_DIR = f"{VM_HOME}/{REMOTE_DIR_NAME}"  # code and venv land here (`fab setup`)
VM_RUNS_DIR = f"{VM_WORK_DIR}/{RUNS_DIR_NAME}"  # exported as TINYCLOUD_RUNS in /etc/environment
VM_STATE_DIR = "/var/lib/tinycloud"
VM_READY_MARKER = f"{VM_STATE_DIR}/ready"  # the bootstrap's last act: the VM is set up
VM_KEEP_AWAKE = f"{VM_STATE_DIR}/keep-awake"  # while it exists the idle stop never fires
VM_SETTINGS = "/etc/tinycloud/idle.env"  # the stack's settings for the VM's own scripts (shell)
VM_BOOT_LOG = f"{VM_STATE_DIR}/boots.log"  # one line per boot: boot id, start, last seen (epoch s)
MAX_RUN_HOURS_ENV = "TINYCLOUD_MAX_RUN_HOURS"  # in VM_SETTINGS: the hard cap (0 = none)

# --- environment variables -----------------------------------------------------------------------
ENV_PREFIX = "TINYCLOUD_"  # every variable tinycloud reads starts so (see remote/paths.py)
RUNS_ENV = "TINYCLOUD_RUNS"  # the runs root a job writes under; `fab` and cloud-init set it
API_KEY_ENV = "TINYCLOUD_API_KEY"  # the native server's API key, from a 0600 env file
# The instance's price in USD an hour: `fab train` sets it from the stack outputs (cost_per_hour)
# and every job records elapsed time x price in run.json. Absent (a local run): it costs 0.
COST_PER_HOUR_ENV = "TINYCLOUD_COST_PER_HOUR"


# --- contract 1: the stack outputs `pulumi up` exports and `fab` reads ---------------------------
class Output(StrEnum):
    INSTANCE_ID = "instance_id"
    PUBLIC_DNS = "public_dns"
    PUBLIC_IP = "public_ip"
    REGION = "region"
    INSTANCE_TYPE = "instance_type"
    SSH_USER = "ssh_user"
    API_PORT = "api_port"
    API_URL = "api_url"
    PRIVATE_KEY = "private_key"  # secret
    HOST_PUBLIC_KEY = "host_public_key"
    ALLOWED_CIDRS = "allowed_cidrs"
    COST_PER_HOUR = "cost_per_hour"


# --- contract 2: the run directory ---------------------------------------------------------------
RUN_JSON = "run.json"  # arguments, versions, status, pid, progress; rewritten atomically
TRAIN_LOG = "train.log"  # the job's own log lines
CONSOLE_LOG = "console.log"  # raw stdout/stderr of a detached job (progress bars, tracebacks)
METRICS = "metrics.jsonl"  # one JSON object per logged step
CHECKPOINT = "ckpt.pt"  # pretrain's last complete checkpoint
BEST_WEIGHTS = "best.pt"  # pretrain --keep best: the weights of the best evaluation so far
TRAINER_CHECKPOINTS = "checkpoints"  # Trainer's checkpoint-N dirs (finetune, dpo)
LOSS_PLOT = "loss.png"
MODEL_DIR = "model"  # a save_pretrained directory TGI and the native server both load
ADAPTER_DIR = "adapter"  # in a LoRA run's model/: its adapter alone (peft's files), for serving
MANIFEST = "manifest.sha256"  # sha256sum-format digests of the deliverables
PID_FILE = ".pid"  # the detached launcher's pid, written by `fab train` beside run.json
PROMPT_FORMAT_FILE = "prompt_format.json"  # in model/: the instruction format, as data


class RunState(StrEnum):
    """``status`` in run.json. A run whose status is RUNNING but whose pid is gone was killed."""

    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    INTERRUPTED = "interrupted"


class RunKey(StrEnum):
    """The run.json keys read outside the job that wrote them (`fab status`, `fab runs`,
    `fab runs --compare`). Every job writes each one; a value that does not apply is null."""

    JOB = "job"  # pretrain | finetune | evaluate
    STATUS = "status"  # a RunState
    STARTED_AT = "started_at"
    FINISHED_AT = "finished_at"
    UPDATED_AT = "updated_at"
    # progress, updated as the run goes
    STEP = "step"  # optimizer steps done (evaluate: answers written)
    MAX_STEPS = "max_steps"
    LOSS = "loss"  # the last logged training loss
    VAL_LOSS = "val_loss"  # the last validation loss
    TOKENS_PER_S = "tokens_per_s"  # training tokens a second, last log window (DPO: null)
    ETA_S = "eta_s"
    # time and money: wall time actually spent running, summed over every resume
    ELAPSED_S = "elapsed_s"
    COST_PER_HOUR_USD = "cost_per_hour_usd"  # $COST_PER_HOUR_ENV during the latest session
    COST_USD = "cost_usd"  # each session's elapsed time x its hourly price, summed
    # what a comparison of runs needs
    TRAIN_EXAMPLES = "train_examples"  # examples (or DPO pairs) trained on; pretrain: null
    TRAIN_TOKENS = "train_tokens"  # tokens in the training data; DPO: null
    BEST_VAL_LOSS = "best_val_loss"  # the lowest validation loss of the run
    FINAL_VAL_LOSS = "final_val_loss"  # the validation loss at the last step
    KEPT_STEP = "kept_step"  # the step whose weights are in model/ (--keep last|best)


RUN_NAME_RULE = "letters, digits, '.', '_' and '-', starting with a letter or digit"
_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def is_run_name(name: str) -> bool:
    """One path component that is safe unquoted in a shell line and a URL."""
    return bool(_RUN_NAME.fullmatch(name))


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """The digest ``manifest.sha256`` records (and ``sha256sum`` prints) for one file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# --- contract 3: TGI's HTTP API ------------------------------------------------------------------
class FinishReason(StrEnum):
    """TGI's ``details.finish_reason`` values."""

    LENGTH = "length"
    EOS = "eos_token"
    STOP = "stop_sequence"


# --- how a duration is written, wherever a person reads one --------------------------------------
def duration(seconds: float) -> str:
    """``0:03:05``: hours, minutes, seconds — the same in logs, tables and summaries."""
    s = max(0, int(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
