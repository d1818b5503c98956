"""Jobs shipped to the VM: `pretrain`, `finetune`, `evaluate`.

Self-contained: they import only torch, transformers, datasets, peft, trl and the standard
library, never Fabric, Pulumi or boto3, so `python -m remote.jobs.pretrain` runs on a bare VM
environment. Each job writes one run directory (see `rundir.py`).
"""
