"""Just enough torch.distributed for the jobs to run unchanged under `torchrun`.

    torchrun --nproc_per_node=2 -m remote.jobs.pretrain ...   # 2 CPU processes, gloo
    python -m remote.jobs.pretrain ...                        # world of one, no process group

Rank 0 alone writes the run directory; every rank reads its own slice of the data.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from remote.jobs.errors import JobError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup() -> Dist:
    """Join the process group that torchrun describes in the environment, if any.

    NCCL when CUDA is present, gloo otherwise (CPU-only VMs and the tests).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch
    import torch.distributed as tdist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local)
    if not tdist.is_initialized():
        tdist.init_process_group(backend=backend)
    return Dist(rank=rank, local_rank=local, world_size=world)


def barrier(d: Dist) -> None:
    if d.enabled:
        import torch.distributed as tdist

        tdist.barrier()


def all_reduce_mean(value: float, d: Dist) -> float:
    """Average a scalar over ranks (for logging a loss every rank agrees on)."""
    if not d.enabled:
        return value
    import torch
    import torch.distributed as tdist

    t = torch.tensor([value], dtype=torch.float64, device=_device())
    tdist.all_reduce(t)
    return float(t.item()) / d.world_size


def all_reduce_sum(values: list[float], d: Dist) -> list[float]:
    """Sum several scalars over ranks in one collective (a loss and a stop flag, say)."""
    if not d.enabled:
        return list(values)
    import torch
    import torch.distributed as tdist

    t = torch.tensor(values, dtype=torch.float64, device=_device())
    tdist.all_reduce(t)
    return [float(v) for v in t.tolist()]


def _device() -> str:
    """Where a collective's tensor must live: NCCL reduces CUDA tensors only."""
    import torch
    import torch.distributed as tdist

    return f"cuda:{torch.cuda.current_device()}" if tdist.get_backend() == "nccl" else "cpu"


def any_rank(flag: bool, d: Dist) -> bool:
    """Whether ``flag`` holds on any rank, the same answer on every rank (a stop request that
    reached one process, say, so that all stop at the same point)."""
    return all_reduce_sum([float(flag)], d)[0] > 0


def broadcast_object(obj: Any, d: Dist) -> Any:
    """Rank 0's ``obj`` on every rank (what rank 0 prepared, or the error it hit)."""
    if not d.enabled:
        return obj
    import torch.distributed as tdist

    box = [obj if d.is_main else None]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(d: Dist, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn`` on rank 0 only (None elsewhere); a JobError there is raised on every rank, and a
    bug there stops every rank too, so none waits forever at the next collective."""
    result, error, bug = None, None, None
    if d.is_main:
        try:
            result = fn(*args, **kwargs)
        except JobError as exc:
            error = str(exc)
        except BaseException as exc:
            error, bug = f"rank 0 failed: {exc!r}", exc
    error = broadcast_object(error, d)
    if bug is not None:
        raise bug
    if error:
        raise JobError(error)
    return result


def gather_objects(obj: Any, d: Dist) -> list[Any]:
    """Every rank's ``obj``, in rank order (each rank's RNG state, for a checkpoint)."""
    if not d.enabled:
        return [obj]
    import torch.distributed as tdist

    out: list[Any] = [None] * d.world_size
    tdist.all_gather_object(out, obj)
    return out


def cleanup(d: Dist, *, together: bool = True) -> None:
    """Leave the process group. ``together`` (every rank got here normally): meet at a barrier
    first, so no rank tears gloo down while another is still inside it — which can abort the
    process ("terminate called without an active exception"). After a crash on one rank,
    torchrun stops the others; waiting for them at a barrier would only hang."""
    if d.enabled:
        import torch.distributed as tdist

        if tdist.is_initialized():
            if together:
                tdist.barrier()
            tdist.destroy_process_group()
