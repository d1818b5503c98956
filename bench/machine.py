"""What the machine a bench runs on can do: its CPU, memory bandwidth and matmul peak.

    uv run python bench/machine.py        # prints the three facts (~10 s)

Every bench prints these beside its ratios, so a figure read later says which machine made it
and how far it is from that machine's ceiling: decoding one stream is bound by reading the
weights once per token (bandwidth), training by the matmul rate (peak).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import time
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Machine:
    cpu: str
    cores: int
    threads: int
    bandwidth_gbs: float  # read bandwidth, GB/s (10^9 bytes), all torch threads
    fp32_peak_gflops: float  # GEMM rate of all torch threads, from their CPU time

    def line(self) -> str:
        return (
            f"machine: {self.cpu}, {self.cores} cores, torch threads {self.threads}; "
            f"memory read {self.bandwidth_gbs:.1f} GB/s; fp32 matmul peak "
            f"{self.fp32_peak_gflops:.1f} GFLOP/s; {datetime.date.today().isoformat()}"
        )


def cpu_model() -> str:
    """The CPU's marketing name (Linux), or what platform knows elsewhere."""
    info = Path("/proc/cpuinfo")
    if info.exists():
        for line in info.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def memory_bandwidth_gbs(seconds: float = 2.0, megabytes: int = 256) -> float:
    """Best read rate over a buffer far larger than any cache (sum of float32s in torch's
    threads): the rate at which a decode step can stream its weights, at best."""
    import torch

    x = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32)
    x.sum()
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        x.sum()
        best = max(best, x.numel() * 4 / max(time.perf_counter() - t, 1e-9))
    return best / 1e9


def matmul_peak_gflops(seconds: float = 3.0, dtype: str = "float32") -> float:
    """Best GEMM rate per CPU-second of all threads, times the thread count: what this
    machine's cores deliver when they are ours alone (the ceiling for training rates)."""
    import torch

    a, b = (torch.randn(2048, 2048, dtype=getattr(torch, dtype)) for _ in range(2))
    best, end = 0.0, time.perf_counter() + seconds
    torch.mm(a, b)
    while time.perf_counter() < end:
        t = time.process_time()
        torch.mm(a, b)
        cpu = (time.process_time() - t) / torch.get_num_threads()
        best = max(best, 2 * 2048**3 / max(cpu, 1e-9))
    return best / 1e9


def measure() -> Machine:
    import torch

    return Machine(
        cpu=cpu_model(),
        cores=os.cpu_count() or 1,
        threads=torch.get_num_threads(),
        bandwidth_gbs=memory_bandwidth_gbs(),
        fp32_peak_gflops=matmul_peak_gflops(),
    )


if __name__ == "__main__":
    print(measure().line())
